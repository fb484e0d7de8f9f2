"""JWT attacks over real HTTP, on uvicorn (ASGI) and werkzeug (WSGI): every one is a 401 ``invalid_token``, never a
500, and none of them leaves a trace in the store.

Attack tokens are built by hand (base64url JSON header and payload, signed with ``hmac`` or the RSA key) or with
PyJWT where it can build them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from jwt.algorithms import RSAAlgorithm

from sa_middleware import Guard
from sa_middleware.asgi import SessionAwareMiddleware
from sa_middleware.demo import DemoIssuer, Workbench, serve_asgi, serve_wsgi, workbench_guard
from sa_middleware.tokens import generate_rsa_key, mint_token
from sa_middleware.wsgi import SessionAwareWSGIMiddleware

WAIT = 10.0


# -- servers and keys ---------------------------------------------------------------------------------------------

@dataclass
class Kit:
    issuer: DemoIssuer
    attacker_key: Any  # an RSA private key the server does not trust
    attacker_pem: str


@pytest.fixture(scope="module")
def kit() -> Kit:
    attacker_key, attacker_pem = generate_rsa_key()
    return Kit(DemoIssuer(), attacker_key, attacker_pem)


@dataclass
class Server:
    base: str
    guard: Guard

    def get(self, authorization: str | bytes | None) -> httpx.Response:
        headers: dict[str, str | bytes] = {"user-agent": "jwt-attacks"}
        if authorization is not None:
            headers["authorization"] = authorization
        return httpx.get(self.base + "/whoami", headers=headers, timeout=WAIT)


@pytest.fixture(scope="module", params=["asgi", "wsgi"])
def server(request: pytest.FixtureRequest, kit: Kit, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    db = tmp_path_factory.mktemp(request.param) / "sa.db"
    guard = workbench_guard(kit.issuer, f"sqlite:///{db}")
    bench = Workbench()
    if request.param == "asgi":
        base, stop = serve_asgi(SessionAwareMiddleware(bench.asgi, guard=guard))
    else:
        base, stop = serve_wsgi(SessionAwareWSGIMiddleware(bench.wsgi, guard=guard))
    try:
        yield Server(base, guard)
    finally:
        stop()
        guard.close()


# -- token building -----------------------------------------------------------------------------------------------

def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def segment(obj: Any) -> str:
    return b64(json.dumps(obj, separators=(",", ":")).encode())


def claims(kit: Kit, who: str, **over: Any) -> dict[str, Any]:
    """Valid claims for the workbench, with ``over`` applied (a value of ``...`` removes the claim)."""
    now = int(time.time())
    base: dict[str, Any] = {"iss": kit.issuer.issuer, "aud": kit.issuer.audience, "sub": who, "iat": now,
                            "exp": now + 600, "jti": uuid.uuid4().hex}
    base.update(over)
    return {k: v for k, v in base.items() if v is not ...}


def rs256(kit: Kit, payload: dict[str, Any], headers: dict[str, Any] | None = None, key: Any = None) -> str:
    return mint_token(key or kit.issuer.private_key, "RS256", payload, {"kid": "demo-1", **(headers or {})})


def rs256_raw(kit: Kit, header: dict[str, Any], payload: dict[str, Any]) -> str:
    """RS256 signed by hand, for headers PyJWT refuses to write (e.g. a kid that is not a string)."""
    signing_input = f"{segment({'alg': 'RS256', 'typ': 'JWT', **header})}.{segment(payload)}"
    signature = kit.issuer.private_key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64(signature)}"


def hs256(secret: bytes, header: dict[str, Any], payload: dict[str, Any]) -> str:
    signing_input = f"{segment(header)}.{segment(payload)}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def unsigned(alg: str, payload: dict[str, Any], signature: str = "") -> str:
    return f"{segment({'alg': alg, 'typ': 'JWT'})}.{segment(payload)}.{signature}"


def flip(text: str, index: int) -> str:
    return text[:index] + ("A" if text[index] != "A" else "B") + text[index + 1:]


def oversized(kit: Kit, sub: str) -> str:
    token = rs256(kit, claims(kit, sub, pad=""))
    return rs256(kit, claims(kit, sub, pad="x" * int((9000 - len(token)) * 3 / 4)))


Attack = Callable[[Kit, str], str | bytes]


def _alg_none(alg: str) -> Attack:
    return lambda k, s: unsigned(alg, claims(k, s))


def _with_kid(kid: Any) -> Attack:
    return lambda k, s: rs256_raw(k, {"kid": kid}, claims(k, s))

ATTACKS: dict[str, Attack] = {
    # alg none, in several letter cases, with no signature, a junk one and a real one
    **{f"alg-{alg}-empty-signature": _alg_none(alg)
       for alg in ("none", "None", "NONE", "nOnE")},
    "alg-none-junk-signature": lambda k, s: unsigned("none", claims(k, s), "c2lnbmF0dXJl"),
    "alg-none-real-signature": lambda k, s: unsigned("none", claims(k, s), rs256(k, claims(k, s)).split(".")[2]),
    "alg-missing": lambda k, s: f"{segment({'typ': 'JWT'})}.{segment(claims(k, s))}.c2ln",
    "alg-not-allow-listed-RS512": lambda k, s: mint_token(k.issuer.private_key, "RS512", claims(k, s)),
    "alg-not-allow-listed-PS256": lambda k, s: mint_token(k.issuer.private_key, "PS256", claims(k, s)),
    # key confusion: HS256 with the server's RSA public key as the HMAC secret
    "hs256-public-pem-as-secret": lambda k, s: hs256(k.issuer.public_pem.encode(),
                                                     {"alg": "HS256", "typ": "JWT"}, claims(k, s)),
    "hs256-public-pem-stripped": lambda k, s: hs256(k.issuer.public_pem.strip().encode(),
                                                    {"alg": "HS256", "typ": "JWT", "kid": "demo-1"}, claims(k, s)),
    "hs256-public-der-as-secret": lambda k, s: hs256(
        k.issuer.private_key.public_key().public_bytes(serialization.Encoding.DER,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo),
        {"alg": "HS256", "typ": "JWT"}, claims(k, s)),
    "hs256-empty-secret": lambda k, s: hs256(b"", {"alg": "HS256", "typ": "JWT"}, claims(k, s)),
    # broken signatures
    "signature-flipped": lambda k, s: (lambda t: flip(t, len(t) - 100))(rs256(k, claims(k, s))),
    "signature-truncated": lambda k, s: rs256(k, claims(k, s))[:-8],
    "signature-of-another-token": lambda k, s: ".".join(
        [*rs256(k, claims(k, s)).split(".")[:2], rs256(k, claims(k, "someone-else")).split(".")[2]]),
    "payload-swapped-signature-kept": lambda k, s: (lambda t: ".".join(
        [t.split(".")[0], segment(claims(k, s, scope="payments:approve")), t.split(".")[2]]))(rs256(k, claims(k, s))),
    "signed-by-an-untrusted-key": lambda k, s: rs256(k, claims(k, s), key=k.attacker_key),
    "signature-missing": lambda k, s: rs256(k, claims(k, s)).rsplit(".", 1)[0] + ".",
    "two-segments": lambda k, s: rs256(k, claims(k, s)).rsplit(".", 1)[0],
    "four-segments": lambda k, s: rs256(k, claims(k, s)) + ".AAAA",
    # characters outside base64url
    "plus-and-slash": lambda k, s: (lambda t: t[:20] + "+/" + t[22:])(rs256(k, claims(k, s))),
    "padding": lambda k, s: (lambda h, p, g: f"{h}==.{p}.{g}")(*rs256(k, claims(k, s)).split(".")),
    "asterisk": lambda k, s: rs256(k, claims(k, s)) + "*",
    "inner-space": lambda k, s: (lambda t: t[:30] + " " + t[30:])(rs256(k, claims(k, s))),
    "latin1-byte": lambda k, s: b"Bearer " + rs256(k, claims(k, s)).encode()[:40] + b"\xe9"
                                + rs256(k, claims(k, s)).encode()[41:],
    "header-not-json": lambda k, s: f"{b64(b'not json')}.{segment(claims(k, s))}.c2ln",
    "header-json-array": lambda k, s: f"{b64(b'[1,2]')}.{segment(claims(k, s))}.c2ln",
    "header-deeply-nested": lambda k, s: f"{b64(b'[' * 5000 + b']' * 5000)}.{segment(claims(k, s))}.c2ln",
    "payload-not-json": lambda k, s: f"{segment({'alg': 'RS256', 'kid': 'demo-1'})}.{b64(b'{oops')}.c2ln",
    # oversized: a genuinely signed token just over 8 KiB (below the servers' header limits)
    "oversized-9000-bytes": oversized,
    # keys must never come from the token
    "jku-header": lambda k, s: rs256(k, claims(k, s), {"jku": "https://evil.example/jwks.json"}),
    "x5u-header": lambda k, s: rs256(k, claims(k, s), {"x5u": "https://evil.example/cert.pem"}),
    "jwk-header-attacker-key": lambda k, s: rs256(
        k, claims(k, s), {"jwk": RSAAlgorithm.to_jwk(k.attacker_key.public_key(), as_dict=True)}, key=k.attacker_key),
    "jwk-header-server-key": lambda k, s: rs256(
        k, claims(k, s), {"jwk": RSAAlgorithm.to_jwk(k.issuer.private_key.public_key(), as_dict=True)}),
    "x5c-header": lambda k, s: rs256(k, claims(k, s), {"x5c": ["MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA"]}),
    "crit-header": lambda k, s: rs256(k, claims(k, s), {"crit": ["exp"]}),
    # kid path traversal and injection (signed with the real key: only the kid is wrong)
    **{f"kid-{name}": _with_kid(kid)
       for name, kid in (("traversal", "../../../../../../dev/null"), ("absolute", "/etc/passwd"),
                         ("backslash", "..\\..\\keys\\private.pem"), ("encoded", "%2e%2e%2f%2e%2e%2fetc%2fpasswd"),
                         ("sql", "x' UNION SELECT 'secret' --"), ("nul", "demo-1\u0000"),
                         ("too-long", "k" * 200), ("number", 7), ("object", {"path": "/dev/null"}))},
    "kid-traversal-hs256-empty-key": lambda k, s: hs256(
        b"", {"alg": "HS256", "typ": "JWT", "kid": "../../../../dev/null"}, claims(k, s)),
    # time and audience claims
    "expired": lambda k, s: rs256(k, claims(k, s, iat=int(time.time()) - 7200, exp=int(time.time()) - 3600)),
    "expired-beyond-leeway": lambda k, s: rs256(k, claims(k, s, exp=int(time.time()) - 60)),
    "not-yet-valid": lambda k, s: rs256(k, claims(k, s, nbf=int(time.time()) + 3600)),
    "issued-in-the-future": lambda k, s: rs256(k, claims(k, s, iat=int(time.time()) + 3600)),
    "exp-missing": lambda k, s: rs256(k, claims(k, s, exp=...)),
    "exp-string": lambda k, s: rs256(k, claims(k, s, exp=str(int(time.time()) + 600))),
    "exp-boolean": lambda k, s: rs256(k, claims(k, s, exp=True)),
    "iat-missing": lambda k, s: rs256(k, claims(k, s, iat=...)),
    "sub-missing": lambda k, s: rs256(k, claims(k, s, sub=...)),
    "wrong-iss": lambda k, s: rs256(k, claims(k, s, iss="https://evil.example")),
    "iss-missing": lambda k, s: rs256(k, claims(k, s, iss=...)),
    "wrong-aud": lambda k, s: rs256(k, claims(k, s, aud="another-api")),
    "aud-list-without-ours": lambda k, s: rs256(k, claims(k, s, aud=["another-api", "third-api"])),
    "aud-missing": lambda k, s: rs256(k, claims(k, s, aud=...)),
    # the header itself
    "empty-bearer": lambda k, s: "Bearer",
    "two-authorization-tokens": lambda k, s: f"Bearer {rs256(k, claims(k, s))}, Bearer {rs256(k, claims(k, s))}",
}


def authorization(value: str | bytes) -> str | bytes:
    if isinstance(value, bytes) or value.startswith("Bearer"):
        return value
    return f"Bearer {value}"


def assert_invalid_token(resp: httpx.Response, token: str | bytes) -> None:
    assert resp.status_code == 401, (resp.status_code, resp.text[:300])
    assert resp.headers["content-type"] == "application/problem+json"
    body = resp.json()
    assert body["code"] == "invalid_token", body
    assert resp.headers["www-authenticate"].startswith('Bearer error="invalid_token"')
    text = token.decode("latin-1") if isinstance(token, bytes) else token
    for part in text.removeprefix("Bearer ").split("."):
        if len(part) > 16:
            assert part not in resp.text and part not in resp.headers["www-authenticate"], "token echoed back"


def test_a_valid_token_is_admitted(server: Server, kit: Kit) -> None:
    """The control: the same server admits a well-formed token, so the refusals below are about the attack."""
    sub = f"honest-{uuid.uuid4().hex[:6]}"
    resp = server.get(f"Bearer {rs256(kit, claims(kit, sub))}")
    assert resp.status_code == 200 and resp.json()["principal"] == sub
    big = rs256(kit, claims(kit, sub, pad="x" * 5000))  # large but under the 8 KiB limit
    assert 6000 < len(big) < 8192
    assert server.get(f"Bearer {big}").status_code == 200


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_attack_is_refused_with_invalid_token(server: Server, kit: Kit, attack: str) -> None:
    sub = f"attacker-{uuid.uuid4().hex[:8]}"
    token = ATTACKS[attack](kit, sub)
    if attack == "oversized-9000-bytes":
        assert isinstance(token, str) and 8192 < len(token) < 9500
    assert_invalid_token(server.get(authorization(token)), token)
    assert server.guard.sessions(sub) == []  # nothing was recorded for a refused token


# Validly signed tokens whose session-aware claims are malformed: the Guard means to refuse them as invalid_token
# (guard.py ``_build``); a 500 or a 503 here is a bug.
MALFORMED_CLAIMS: dict[str, dict[str, Any]] = {
    "kind-unknown": {"sa_kind": "robot"},
    "kind-list": {"sa_kind": ["agent"]},
    "kind-object": {"sa_kind": {"kind": "agent"}},
    "gen-negative": {"gen": -1},
    "gen-string": {"gen": "2"},
    "gen-float": {"gen": 1.5},
    "gen-boolean": {"gen": True},
    "gen-beyond-64-bits": {"gen": 2**64},
    "gen-2-to-the-63": {"gen": 2**63},
    "sid-number": {"sid": 5},
    "sid-too-long": {"sid": "s" * 300},
    "sid-empty": {"sid": ""},
    "jti-too-long": {"jti": "j" * 300},
    "act-sub-number": {"act": {"sub": 5}},
    "cnf-jkt-list": {"cnf": {"jkt": ["x"]}},
}


@pytest.mark.parametrize("case", list(MALFORMED_CLAIMS))
def test_signed_token_with_malformed_claims_is_invalid_token(server: Server, kit: Kit, case: str) -> None:
    sub = f"odd-{uuid.uuid4().hex[:8]}"
    token = rs256(kit, claims(kit, sub, **MALFORMED_CLAIMS[case]))
    assert_invalid_token(server.get(f"Bearer {token}"), token)
    assert server.guard.sessions(sub) == []


def test_attack_tokens_are_not_cached_as_valid(server: Server, kit: Kit) -> None:
    """A forged token refused once is refused again (failures are never cached, and never turn into a pass)."""
    sub = f"attacker-{uuid.uuid4().hex[:8]}"
    token = ATTACKS["signed-by-an-untrusted-key"](kit, sub)
    for _ in range(3):
        assert_invalid_token(server.get(authorization(token)), token)


def test_pyjwt_cannot_even_build_the_key_confusion_token(kit: Kit) -> None:
    """Documents why the HS256 key-confusion tokens above are built by hand."""
    with pytest.raises(jwt.InvalidKeyError):
        jwt.encode({"sub": "x"}, kit.issuer.public_pem, algorithm="HS256")
