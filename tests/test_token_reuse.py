"""Token reuse and sender-constrained tokens: DPoP proofs (RFC 9449), certificate-bound tokens (RFC 8705), the
client identity of the reuse check, and ``reuse_is_compromise`` (sa_middleware.dpop and the Guard).

These drive the Guard directly with :class:`RequestInfo` values (the middleware builds the same ones; the real-server
questions are in ``tests/e2e/test_token_reuse_http.py``). Tickets are held by not releasing them: "in flight" is
exact here, no timing involved.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from dpop_support import Authority, Holder, b64, hs256_proof, unsigned_proof
from werkzeug.test import create_environ

from sa_middleware import ConfigurationError, Denial, Guard, InvalidToken, Policy, RequestInfo
from sa_middleware.asgi import request_info as asgi_request_info
from sa_middleware.demo import DemoIssuer
from sa_middleware.dpop import (
    Binding,
    DPoPVerifier,
    InvalidDPoPProof,
    access_token_hash,
    certificate_thumbprint,
    jwk_thumbprint,
)
from sa_middleware.guard import Admitted, Outcome
from sa_middleware.responses import denial_response
from sa_middleware.stores.memory import MemoryStore
from sa_middleware.wsgi import request_info as wsgi_request_info

URL = "https://api.example/items"
POLICIES = {"GET /items": Policy(), "POST /items": Policy(), "GET /admin": Policy(scopes={"admin"}),
            "GET /public": Policy(public=True), "WEBSOCKET /items": Policy()}


def make(issuer: DemoIssuer, store: Any = None, **options: Any) -> Guard:
    return Guard(store=store or MemoryStore(), keys=issuer.public_pem, algorithms=["RS256"], issuer=issuer.issuer,
                 audience=issuer.audience, policies=POLICIES, **options)


@pytest.fixture
def guard(issuer: DemoIssuer) -> Iterator[Guard]:
    g = make(issuer)
    try:
        yield g
    finally:
        g.close()


@pytest.fixture(scope="module")
def holder() -> Holder:
    return Holder("ES256")


@pytest.fixture(scope="module")
def other() -> Holder:
    return Holder("ES256")


def req(token: str | None, *, scheme: str = "DPoP", proof: str | None = None, method: str = "GET",
        path: str = "/items", client: str = "10.0.0.1", ua: str = "app/1", cert: str | None = None,
        host: str = "api.example", url_scheme: str = "https", headers: dict[str, str] | None = None) -> RequestInfo:
    all_headers = {"user-agent": ua, "host": host, **(headers or {})}
    if token is not None:
        all_headers["authorization"] = f"{scheme} {token}"
    if proof is not None:
        all_headers["dpop"] = proof
    return RequestInfo(method, path, all_headers, client, scheme=url_scheme, host=host, client_cert=cert)


def admitted(outcome: Outcome) -> Admitted:
    assert isinstance(outcome, Admitted), f"expected admission, got {outcome!r}"
    return outcome


def denied(outcome: Outcome, code: str) -> Denial:
    assert isinstance(outcome, Denial), f"expected {code}, got {outcome!r}"
    assert outcome.code == code, outcome
    return outcome


def challenge(denial: Denial, realm: str | None = None) -> str:
    _, headers, _ = denial_response(denial, realm)
    return dict(headers)["www-authenticate"]


def bound(issuer: DemoIssuer, who: str, holder: Holder, **claims: Any) -> str:
    return issuer.token(who, cnf={"jkt": holder.jkt}, **claims)


# ---------------------------------------------------------------------------------------------------- building blocks

def test_rfc7638_thumbprint_example() -> None:
    """RFC 7638 section 3.1: the example RSA key and its thumbprint; optional members do not count."""
    jwk = {"kty": "RSA", "e": "AQAB", "alg": "RS256", "kid": "2011-04-29",
           "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjB"
                "ZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8K"
                "JZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xB"
                "niIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"}
    assert jwk_thumbprint(jwk) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def test_ath_example() -> None:
    """RFC 9449 section 7.1: the example access token and its ``ath``."""
    assert access_token_hash("Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU") == \
        "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo"


def test_client_identity_puts_proven_keys_before_the_user_agent() -> None:
    assert Binding().client("10.0.0.1") == "10.0.0.1"
    assert Binding("K", None).client("10.0.0.1") == "10.0.0.1 jkt:K"
    assert Binding("K", "C").client("::1") == "::1 jkt:K x5t:C"
    assert "|" not in Binding("K").client("a|b")  # the stores append "|user agent": nothing may look like it


@pytest.mark.parametrize("alg", ["ES256", "ES384", "ES512", "EdDSA", "PS256", "RS256"])
def test_every_default_algorithm_verifies(alg: str) -> None:
    holder = Holder(alg)
    request = req("tok", proof=None)
    proof = DPoPVerifier().verify(holder.proof("GET", URL, "tok"), request, "tok")
    assert proof.jkt == holder.jkt


def test_verifier_options_are_validated() -> None:
    for algorithms in (["HS256"], ["none"], "ES256", [], ["ES256", "XS1"]):
        with pytest.raises(ConfigurationError):
            DPoPVerifier(algorithms=algorithms)
    for max_age in (0, -1, float("inf"), float("nan"), True, "60"):
        with pytest.raises(ConfigurationError):
            DPoPVerifier(max_age=max_age)


# -------------------------------------------------------------------------------------------------- DPoP-bound tokens

def test_valid_proof_is_admitted_and_its_key_joins_the_identity(guard: Guard, issuer: DemoIssuer,
                                                                holder: Holder) -> None:
    token = bound(issuer, "alice", holder, sid="a-1")
    outcome = admitted(guard.admit(req(token, proof=holder.proof("GET", URL, token))))
    assert outcome.context.principal == "alice"
    [session] = guard.sessions("alice")
    assert session.client == f"10.0.0.1 jkt:{holder.jkt}"
    assert session.credential == holder.jkt
    guard.release(outcome.ticket)


def test_scheme_is_case_insensitive_and_htu_normalised(guard: Guard, issuer: DemoIssuer, holder: Holder) -> None:
    token = bound(issuer, "alice", holder)
    for url in ("HTTPS://API.EXAMPLE:443/items", "https://api.example/items?page=2#top", "https://api.example/%69tems"):
        admitted(guard.admit(req(token, scheme="dpop", proof=holder.proof("GET", url, token))))


def test_bound_token_sent_as_bearer_is_refused(guard: Guard, issuer: DemoIssuer, holder: Holder) -> None:
    """RFC 9449 section 7.2: a DPoP-bound token presented as a bearer token is refused, even with a valid proof."""
    token = bound(issuer, "alice", holder)
    denial = denied(guard.admit(req(token, scheme="Bearer", proof=holder.proof("GET", URL, token))), "invalid_token")
    header = challenge(denial, "api")
    assert header.startswith('DPoP realm="api", error="invalid_token", error_description="this token is DPoP-bound')
    assert header.endswith('algs="ES256 ES384 ES512 EdDSA PS256 PS384 PS512 RS256 RS384 RS512"')
    assert guard.sessions("alice") == []


def test_bound_token_without_proof_is_invalid_dpop_proof(guard: Guard, issuer: DemoIssuer, holder: Holder) -> None:
    denial = denied(guard.admit(req(bound(issuer, "alice", holder))), "invalid_token")
    assert challenge(denial).startswith('DPoP error="invalid_dpop_proof", error_description="a DPoP-bound token '
                                        'needs a DPoP proof"')
    body = json.loads(denial_response(denial)[2])
    assert body["code"] == "invalid_token" and body["status"] == 401


def test_proof_by_another_key_is_token_reuse(guard: Guard, issuer: DemoIssuer, holder: Holder,
                                             other: Holder) -> None:
    """A valid proof, by a key that is not the token's: a client that does not hold the token's key uses it."""
    token = bound(issuer, "alice", holder)
    denial = denied(guard.admit(req(token, proof=other.proof("GET", URL, token))), "token_reuse")
    assert challenge(denial).startswith('DPoP error="invalid_token", error_description="this token is bound to '
                                        'another key')
    assert guard.sessions("alice") == []


def test_dpop_scheme_with_an_unbound_token_is_refused(guard: Guard, issuer: DemoIssuer, holder: Holder) -> None:
    token = issuer.token("alice")
    denial = denied(guard.admit(req(token, proof=holder.proof("GET", URL, token))), "invalid_token")
    assert "not DPoP-bound" in denial.detail
    assert challenge(denial).startswith('DPoP error="invalid_token"')


def _bad_proofs(holder: Holder, other: Holder, token: str) -> dict[str, str]:
    now = int(time.time())
    good_header = {"typ": "dpop+jwt", "alg": "ES256", "jwk": holder.jwk}
    payload = {"jti": "j", "htm": "GET", "htu": URL, "iat": now, "ath": access_token_hash(token)}
    private_jwk = {**holder.jwk, "d": b64(holder.private_key.private_numbers().private_value.to_bytes(32, "big"))}
    return {
        "wrong htm": holder.proof("POST", URL, token),
        "lower-case htm": holder.proof("get", URL, token),
        "wrong htu path": holder.proof("GET", "https://api.example/other", token),
        "wrong htu host": holder.proof("GET", "https://evil.example/items", token),
        "wrong htu port": holder.proof("GET", "https://api.example:8443/items", token),
        "wrong htu scheme": holder.proof("GET", "http://api.example/items", token),
        "htu with userinfo": holder.proof("GET", "https://me@api.example/items", token),
        "relative htu": holder.proof("GET", "/items", token),
        "htu with a bad port": holder.proof("GET", "https://api.example:99999/items", token),
        "stale iat": holder.proof("GET", URL, token, iat=now - 3600),
        "future iat": holder.proof("GET", URL, token, iat=now + 3600),
        "string iat": holder.proof("GET", URL, token, iat=str(now)),
        "no iat": holder.proof("GET", URL, token, drop=("iat",)),
        "no jti": holder.proof("GET", URL, token, drop=("jti",)),
        "empty jti": holder.proof("GET", URL, token, jti=""),
        "no htu": holder.proof("GET", URL, token, drop=("htu",)),
        "no ath": holder.proof("GET", URL, None),
        "wrong ath": holder.proof("GET", URL, "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJtYWxsb3J5In0.c2lnbmF0dXJl"),
        "bad signature": holder.proof("GET", URL, token, header={"jwk": other.jwk}),
        "private key in jwk": holder.proof("GET", URL, token, header={"jwk": private_jwk}),
        "no jwk": holder.proof("GET", URL, token, header={"jwk": None}),
        "typ JWT": holder.proof("GET", URL, token, header={"typ": "JWT"}),
        "crit header": unsigned_proof({**good_header, "crit": ["exp"]}, payload, b"x"),
        "alg none": unsigned_proof({**good_header, "alg": "none"}, payload, b"x"),
        "alg none, no signature": unsigned_proof({**good_header, "alg": "none"}, payload),
        "HS256": hs256_proof(b"s" * 32, payload),
        "RSA 1024": Holder("RS256", rsa_bits=1024).proof("GET", URL, token),
        "curve mismatch": holder.proof("GET", URL, token, header={"jwk": Holder("ES384").jwk}),
        "two DPoP headers": holder.proof("GET", URL, token) + ", " + holder.proof("GET", URL, token),
        "not a JWS": "not-a-proof",
        "empty": "",
        "empty objects": "e30.e30.e30",
        "payload not JSON": unsigned_proof(good_header, payload)[:-1].rsplit(".", 1)[0] + ".bm90IGpzb24.c2ln",
        "oversized": holder.proof("GET", URL, token, pad="x" * 9000),
        "huge iat": holder.proof("GET", URL, token, iat=10 ** 400),
        "lone surrogate in jwk": holder.proof("GET", URL, token, header={"jwk": {**holder.jwk, "x": "\ud800"}}),
        "lone surrogate in htu": holder.proof("GET", URL + "/\ud800", token),
    }


@pytest.fixture(scope="module")
def bad_proofs(issuer: DemoIssuer, holder: Holder, other: Holder) -> tuple[str, dict[str, str]]:
    token = bound(issuer, "alice", holder)
    return token, _bad_proofs(holder, other, token)


BAD_PROOFS = ["wrong htm", "lower-case htm", "wrong htu path", "wrong htu host", "wrong htu port",
              "wrong htu scheme", "htu with userinfo", "relative htu", "htu with a bad port", "stale iat",
              "future iat", "string iat", "no iat", "no jti", "empty jti", "no htu", "no ath", "wrong ath",
              "bad signature", "private key in jwk", "no jwk", "typ JWT", "crit header", "alg none",
              "alg none, no signature", "HS256", "RSA 1024", "curve mismatch", "two DPoP headers", "not a JWS",
              "empty", "empty objects", "payload not JSON", "oversized", "huge iat", "lone surrogate in jwk",
              "lone surrogate in htu"]


def test_bad_proof_cases_are_all_listed(bad_proofs: tuple[str, dict[str, str]]) -> None:
    assert sorted(BAD_PROOFS) == sorted(bad_proofs[1])


@pytest.mark.parametrize("case", BAD_PROOFS)
def test_bad_proof_is_invalid_dpop_proof(guard: Guard, bad_proofs: tuple[str, dict[str, str]], case: str) -> None:
    token, proofs = bad_proofs
    denial = denied(guard.admit(req(token, proof=proofs[case])), "invalid_token")
    assert denial.detail.startswith("invalid DPoP proof: ")
    assert challenge(denial).startswith('DPoP error="invalid_dpop_proof"')
    assert guard.sessions("alice") == []


def test_unexpected_failure_while_checking_a_proof_is_a_malformed_proof(holder: Holder) -> None:
    def broken_clock() -> float:
        raise RuntimeError("clock unavailable")

    verifier = DPoPVerifier(clock=broken_clock)
    token = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl"
    request = req(token, proof=holder.proof("GET", URL, token))
    with pytest.raises(InvalidDPoPProof, match=r"^malformed proof$"):
        verifier.verify(request.headers["dpop"], request, token)


def test_proof_detail_never_echoes_the_token_or_the_proof(guard: Guard, issuer: DemoIssuer, holder: Holder) -> None:
    token = bound(issuer, "alice", holder)
    proof = holder.proof("POST", URL, token)
    _, headers, body = denial_response(denied(guard.admit(req(token, proof=proof)), "invalid_token"))
    text = body.decode() + "".join(v for _, v in headers)
    assert token not in text and proof not in text and proof.split(".")[2] not in text


def test_websocket_proof_names_the_http_uri(guard: Guard, issuer: DemoIssuer, holder: Holder) -> None:
    token = bound(issuer, "alice", holder)
    scope = {"type": "websocket", "scheme": "wss", "path": "/items", "server": ("10.9.9.9", 443),
             "client": ("10.0.0.1", 5000),
             "headers": [(b"authorization", f"DPoP {token}".encode()), (b"host", b"api.example"),
                         (b"dpop", holder.proof("GET", "https://api.example/items", token).encode())]}
    admitted(guard.admit(asgi_request_info(scope)))


# ----------------------------------------------------------------------------------------------------- unbound tokens

def test_unbound_bearer_token_with_a_proof_counts_the_key(guard: Guard, issuer: DemoIssuer, holder: Holder,
                                                          other: Holder) -> None:
    """A voluntary proof on a bearer token must be valid, and its key joins the identity: the same token in flight
    with another key, or with no proof (omission cannot pose as the key), is reuse."""
    token = issuer.token("alice", sid="a-1")
    first = admitted(guard.admit(req(token, scheme="Bearer", proof=holder.proof("GET", URL, token))))
    denied(guard.admit(req(token, scheme="Bearer", proof=other.proof("GET", URL, token))), "token_reuse")
    denied(guard.admit(req(token, scheme="Bearer")), "token_reuse")
    denied(guard.admit(req(token, scheme="Bearer", ua=f"app/1|jkt:{holder.jkt}")), "token_reuse")
    second = admitted(guard.admit(req(token, scheme="Bearer", proof=holder.proof("GET", URL, token))))
    denied(guard.admit(req(token, scheme="Bearer", proof=holder.proof("POST", URL, token))), "invalid_token")
    guard.release(first.ticket)
    guard.release(second.ticket)
    admitted(guard.admit(req(token, scheme="Bearer")))  # nothing in flight: a client may change


def test_plain_bearer_tokens_are_unchanged(guard: Guard, issuer: DemoIssuer) -> None:
    token = issuer.token("alice")
    held = admitted(guard.admit(req(token, scheme="Bearer")))
    assert guard.sessions("alice")[0].client == "10.0.0.1"
    denied(guard.admit(req(token, scheme="Bearer", client="10.6.6.6")), "token_reuse")
    denied(guard.admit(req(token, scheme="Bearer", ua="curl/8")), "token_reuse")
    guard.release(held.ticket)


# -------------------------------------------------------------------------------------------------- certificate-bound

@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Authority:
    return Authority(tmp_path_factory.mktemp("ca"))


def test_certificate_bound_token(guard: Guard, issuer: DemoIssuer, ca: Authority) -> None:
    mine, theirs = ca.issue("client-a"), ca.issue("client-b")
    assert mine.x5t == certificate_thumbprint(mine.cert_pem) and mine.x5t != theirs.x5t
    token = issuer.token("carol", cnf={"x5t#S256": mine.x5t})
    held = admitted(guard.admit(req(token, scheme="Bearer", cert=mine.cert_pem)))
    assert guard.sessions("carol")[0].client == f"10.0.0.1 x5t:{mine.x5t}"
    denial = denied(guard.admit(req(token, scheme="Bearer", cert=theirs.cert_pem)), "token_reuse")
    assert challenge(denial).startswith('Bearer error="invalid_token"')  # RFC 8705 section 3
    denied(guard.admit(req(token, scheme="Bearer")), "invalid_token")
    denied(guard.admit(req(token, scheme="Bearer", cert="-----BEGIN CERTIFICATE-----\nnope\n")), "invalid_token")
    guard.release(held.ticket)


def test_unbound_token_from_two_certificates_is_reuse(guard: Guard, issuer: DemoIssuer, ca: Authority) -> None:
    a, b = ca.issue("client-c"), ca.issue("client-d")
    token = issuer.token("carol")
    held = admitted(guard.admit(req(token, scheme="Bearer", cert=a.cert_pem)))
    denied(guard.admit(req(token, scheme="Bearer", cert=b.cert_pem)), "token_reuse")
    guard.release(held.ticket)


@pytest.mark.parametrize("claims", [{"cnf": "jkt"}, {"cnf": {"jkt": 5}}, {"cnf": {"x5t#S256": ""}},
                                    {"cnf": {"jkt": "k" * 300}}])
def test_malformed_cnf_is_invalid_token(guard: Guard, issuer: DemoIssuer, claims: dict[str, Any]) -> None:
    denied(guard.admit(req(issuer.token("alice", **claims), scheme="Bearer")), "invalid_token")


def test_upstream_mode_trusts_a_gateway(issuer: DemoIssuer, holder: Holder, ca: Authority) -> None:
    """``sender_constraint="upstream"``: DPoP and mTLS were checked in front; cnf only relates contexts."""
    g = make(issuer, sender_constraint="upstream")
    try:
        admitted(g.admit(req(bound(issuer, "alice", holder), scheme="Bearer", proof="garbage")))
        admitted(g.admit(req(bound(issuer, "alice", holder))))
        admitted(g.admit(req(issuer.token("carol", cnf={"x5t#S256": ca.issue("client-e").x5t}), scheme="Bearer")))
        assert {s.credential for s in g.sessions("alice")} == {holder.jkt}
    finally:
        g.close()


# --------------------------------------------------------------------------------------------------------- challenges

def test_denials_under_the_dpop_scheme_answer_with_a_dpop_challenge(guard: Guard, issuer: DemoIssuer,
                                                                    holder: Holder) -> None:
    token = bound(issuer, "alice", holder, scope="read")
    denial = denied(guard.admit(req(token, path="/admin", proof=holder.proof("GET", "https://api.example/admin",
                                                                              token))), "insufficient_scope")
    assert challenge(denial).startswith('DPoP error="insufficient_scope"')
    assert 'scope="admin"' in challenge(denial)
    assert challenge(denied(guard.admit(req("not.a.token")), "invalid_token")).startswith('DPoP error="invalid_token"')
    assert challenge(denied(guard.admit(req("")), "invalid_token")).startswith("DPoP ")
    assert challenge(denied(guard.admit(req(None)), "missing_token")) == "Bearer"  # unchanged (RFC 6750 3.1)
    assert challenge(denied(guard.admit(req("not.a.token", scheme="Bearer")), "invalid_token")).startswith("Bearer ")


# ------------------------------------------------------------------------------------------------------- request_info

def test_asgi_request_info_reads_scheme_host_and_client_certificate(ca: Authority) -> None:
    cert = ca.issue("client-f")
    scope: dict[str, Any] = {"type": "http", "method": "PUT", "path": "/api/x", "root_path": "/api", "scheme": "https",
                             "server": ("10.1.1.1", 8443), "client": ("10.0.0.1", 5000), "headers": [],
                             "extensions": {"tls": {"client_cert_chain": [cert.cert_pem, "ca"], "server_cert": None}}}
    info = asgi_request_info(scope)
    assert (info.scheme, info.host, info.client_cert) == ("https", "10.1.1.1:8443", cert.cert_pem)
    assert (info.method, info.path, info.app_path, info.client, info.websocket, info.session) == \
        ("PUT", "/api/x", "/x", "10.0.0.1", False, None)
    scope["headers"] = [(b"host", b"api.example")]
    scope["extensions"] = {"tls": {"client_cert_chain": []}}
    info = asgi_request_info(scope)
    assert (info.host, info.client_cert) == ("api.example", None)
    assert asgi_request_info({"type": "websocket", "path": "/", "server": ("::1", 80), "extensions": None}) \
        .host == "[::1]:80"
    bare = asgi_request_info({"type": "http", "path": "/"})
    assert (bare.scheme, bare.host, bare.client_cert) == ("http", "", None)


def test_wsgi_request_info_reads_scheme_host_and_client_certificate(ca: Authority) -> None:
    cert = ca.issue("client-g")
    environ = create_environ("/x", "https://api.example:8443/", headers={"SSL-Client-Cert": "forged"})
    environ["SSL_CLIENT_CERT"] = cert.cert_pem
    info = wsgi_request_info(environ)
    assert (info.scheme, info.host, info.client_cert) == ("https", "api.example:8443", cert.cert_pem)
    one_line = cert.cert_pem.replace("\n", " ")
    environ = create_environ("/x", "http://api.example/", headers={"SSL-Client-Cert": one_line})
    del environ["HTTP_HOST"]
    info = wsgi_request_info(environ)
    assert (info.scheme, info.host, info.client_cert) == ("http", "api.example", None)  # never from a header


def test_request_info_stays_backward_compatible() -> None:
    info = RequestInfo("GET", "/x", {}, "10.0.0.1", False)
    assert (info.scheme, info.host, info.client_cert) == ("http", "", None)


# ------------------------------------------------------------------------------------------------ reuse_is_compromise

def test_option_is_validated(issuer: DemoIssuer) -> None:
    for bad in ("yes", 1, None):
        with pytest.raises(ConfigurationError, match="reuse_is_compromise"):
            make(issuer, reuse_is_compromise=bad)
    with pytest.raises(ConfigurationError, match="sender_constraint"):
        make(issuer, sender_constraint="off")
    with pytest.raises(ConfigurationError, match="dpop_algorithms"):
        make(issuer, dpop_algorithms=["HS256"])
    with pytest.raises(ConfigurationError, match="dpop_max_age"):
        make(issuer, dpop_max_age=0)


@pytest.fixture(params=["memory", "sqlite"])
def store_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return "memory://" if request.param == "memory" else f"sqlite:///{tmp_path / 'reuse.db'}"


def test_reuse_reported_as_compromise(issuer: DemoIssuer, store_uri: str) -> None:
    """With the option, the reuse denial marks every related context compromised: the first client's next request
    and the principal's other sessions get credential_compromised until a newer token."""
    g = make(issuer, store_uri, reuse_is_compromise=True)
    try:
        token = issuer.token("dora", sid="d-1")
        sibling = issuer.token("dora", sid="d-2")
        admitted(g.admit(req(sibling, scheme="Bearer", client="10.0.0.9")))
        held = admitted(g.admit(req(token, scheme="Bearer")))
        denied(g.admit(req(token, scheme="Bearer", client="10.6.6.6")), "token_reuse")
        assert {s.session_id: s.status for s in g.sessions("dora")} == {"d-1": "compromised", "d-2": "compromised"}
        denied(g.admit(req(token, scheme="Bearer")), "credential_compromised")
        denied(g.admit(req(sibling, scheme="Bearer", client="10.0.0.9")), "credential_compromised")
        g.release(held.ticket)
        fresh = issuer.token("dora", sid="d-3", iat=time.time() + 1)
        admitted(g.admit(req(fresh, scheme="Bearer")))
        [record] = [r for r in g.audit(sub="dora") if r.code == "report_compromise"]
        assert record.source == "middleware" and record.session_id == "d-1"
    finally:
        g.close()


def test_without_the_option_nothing_is_reported(issuer: DemoIssuer, store_uri: str) -> None:
    g = make(issuer, store_uri)
    try:
        token = issuer.token("dora", sid="d-1")
        sibling = issuer.token("dora", sid="d-2")
        admitted(g.admit(req(sibling, scheme="Bearer", client="10.0.0.9")))
        held = admitted(g.admit(req(token, scheme="Bearer")))
        denied(g.admit(req(token, scheme="Bearer", client="10.6.6.6")), "token_reuse")
        assert {s.status for s in g.sessions("dora")} == {"active"}
        again = admitted(g.admit(req(token, scheme="Bearer")))
        admitted(g.admit(req(sibling, scheme="Bearer", client="10.0.0.9")))
        assert not [r for r in g.audit(sub="dora") if r.code == "report_compromise"]
        g.release(held.ticket)
        g.release(again.ticket)
    finally:
        g.close()


def test_key_mismatch_reported_as_compromise(issuer: DemoIssuer, holder: Holder, other: Holder) -> None:
    """A proof by another key is token_reuse too (the token leaked without its key): reported with the option."""
    g = make(issuer, reuse_is_compromise=True)
    try:
        token = bound(issuer, "erin", holder, sid="e-1")
        admitted(g.admit(req(token, proof=holder.proof("GET", URL, token))))
        denied(g.admit(req(token, proof=other.proof("GET", URL, token), client="10.6.6.6")), "token_reuse")
        denied(g.admit(req(token, proof=holder.proof("GET", URL, token))), "credential_compromised")
    finally:
        g.close()


def test_async_path_reports_too(issuer: DemoIssuer) -> None:
    g = make(issuer, reuse_is_compromise=True)
    try:
        token = issuer.token("finn", sid="f-1")

        async def main() -> None:
            held = admitted(await g.aadmit(req(token, scheme="Bearer")))
            denied(await g.aadmit(req(token, scheme="Bearer", ua="other/2")), "token_reuse")
            denied(await g.aadmit(req(token, scheme="Bearer")), "credential_compromised")
            await g.arelease(held.ticket)
        anyio.run(main)
        assert [s.status for s in g.sessions("finn")] == ["compromised"]
    finally:
        g.close()


def test_failed_report_leaves_the_denial(issuer: DemoIssuer, caplog: pytest.LogCaptureFixture) -> None:
    class Failing(MemoryStore):
        def report_compromise(self, sub: str | None, session_id: str | None) -> list[str]:
            raise RuntimeError("store down")

    g = make(issuer, Failing(), reuse_is_compromise=True)
    try:
        token = issuer.token("gus", sid="g-1")
        held = admitted(g.admit(req(token, scheme="Bearer")))
        with caplog.at_level(logging.WARNING, logger="sa_middleware"):
            denied(g.admit(req(token, scheme="Bearer", client="10.6.6.6")), "token_reuse")
        assert "could not be reported" in caplog.text and token not in caplog.text
        g.release(held.ticket)
    finally:
        g.close()


def test_invalid_proof_is_never_reported(issuer: DemoIssuer, holder: Holder) -> None:
    """Only a proven reuse reports: an invalid proof (anyone can make one) is invalid_token, nothing more."""
    g = make(issuer, reuse_is_compromise=True)
    try:
        token = bound(issuer, "hana", holder, sid="h-1")
        admitted(g.admit(req(token, proof=holder.proof("GET", URL, token))))
        denied(g.admit(req(token, proof=holder.proof("GET", URL, token, iat=0))), "invalid_token")
        admitted(g.admit(req(token, proof=holder.proof("GET", URL, token))))
    finally:
        g.close()


def test_invalid_dpop_proof_is_an_invalid_token() -> None:
    assert issubclass(InvalidDPoPProof, InvalidToken)
    with pytest.raises(InvalidDPoPProof, match="htm"):
        DPoPVerifier().verify(Holder().proof("PUT", URL, "t"), req("t"), "t")
