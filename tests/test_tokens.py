"""Tests for sa_middleware.tokens: valid tokens, the cache, JWKS handling and the attack list."""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import http.server
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from jwt.algorithms import RSAAlgorithm

from sa_middleware.errors import ConfigurationError, InvalidToken, KeysUnavailable
from sa_middleware.tokens import TokenVerifier, VerifiedToken, generate_rsa_key, mint_token

ISS = "https://idp.example"
AUD = "payments-api"
HS_SECRET = b"s" * 32
TYP = {"typ": "at+jwt"}


# ---------------------------------------------------------------------------- helpers


def b64(data: bytes | str | dict[str, Any]) -> str:
    if isinstance(data, dict):
        data = json.dumps(data, separators=(",", ":"))
    if isinstance(data, str):
        data = data.encode()
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {"sub": "alice", "iat": now, "exp": now + 300, "iss": ISS, "aud": AUD}
    for name, value in overrides.items():
        if value is _DROP:
            base.pop(name, None)
        else:
            base[name] = value
    return base


_DROP = object()


def pem_of(key: Any) -> str:
    return str(
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


class FakeClock:
    def __init__(self, now: float | None = None) -> None:
        self.now = time.time() if now is None else now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class DecodeSpy:
    """Counts calls to jwt.decode while delegating to the real one."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        self._real = jwt.decode
        monkeypatch.setattr(jwt, "decode", self)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self._real(*args, **kwargs)


class JWKSServer:
    """A tiny local HTTP server that serves a JWK set and counts the requests it gets."""

    def __init__(self) -> None:
        self.jwks: dict[str, Any] = {"keys": []}
        self.status = 200
        self.hits: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.hits.append(self.path)
                body = json.dumps(outer.jwks).encode()
                self.send_response(outer.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/jwks.json"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def rsa_pair() -> tuple[Any, str]:
    return generate_rsa_key()


@pytest.fixture(scope="module")
def rsa_pair_2() -> tuple[Any, str]:
    return generate_rsa_key()


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[JWKSServer]:
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    srv = JWKSServer()
    yield srv
    srv.close()


def rs_verifier(pem: str, **kwargs: Any) -> TokenVerifier:
    options: dict[str, Any] = {"algorithms": ["RS256"], "issuer": ISS, "audience": AUD}
    options.update(kwargs)
    return TokenVerifier(keys=pem, **options)


def jwk_of(private: Any, kid: str, **extra: Any) -> dict[str, Any]:
    jwk: dict[str, Any] = RSAAlgorithm.to_jwk(private.public_key(), as_dict=True)
    jwk.update(kid=kid, **extra)
    return jwk


# ---------------------------------------------------------------------------- valid tokens


def test_rs256_token_verifies(rsa_pair: tuple[Any, str]) -> None:
    private, pem = rsa_pair
    token = mint_token(private, "RS256", claims(), TYP)
    result = rs_verifier(pem).verify(token)
    assert isinstance(result, VerifiedToken)
    assert result.claims["sub"] == "alice"
    assert result.header["alg"] == "RS256"
    assert result.fingerprint == hashlib.sha256(token.encode()).hexdigest()
    assert result.expires_at == float(result.claims["exp"])
    with pytest.raises(TypeError):
        result.claims["sub"] = "mallory"  # type: ignore[index]


def test_ps256_with_the_same_rsa_key(rsa_pair: tuple[Any, str]) -> None:
    private, pem = rsa_pair
    token = mint_token(private, "PS256", claims())
    assert rs_verifier(pem, algorithms=["RS256", "PS256"]).verify(token).claims["sub"] == "alice"


def test_es256_token_verifies() -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    verifier = TokenVerifier(keys=pem_of(private), algorithms=["ES256"], issuer=ISS, audience=AUD)
    assert verifier.verify(mint_token(private, "ES256", claims())).claims["sub"] == "alice"


def test_es384_key_object_verifies() -> None:
    private = ec.generate_private_key(ec.SECP384R1())
    verifier = TokenVerifier(keys=private.public_key(), algorithms=["ES256", "ES384"])
    assert verifier.verify(mint_token(private, "ES384", claims())).claims["sub"] == "alice"
    # An ES256 token cannot be checked with a P-384 key: no matching key.
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(InvalidToken):
        verifier.verify(mint_token(other, "ES256", claims()))


def test_eddsa_token_verifies() -> None:
    private = ed25519.Ed25519PrivateKey.generate()
    verifier = TokenVerifier(keys=pem_of(private), algorithms=["EdDSA"])
    assert verifier.verify(mint_token(private, "EdDSA", claims())).claims["sub"] == "alice"


def test_hs256_token_verifies() -> None:
    verifier = TokenVerifier(keys=HS_SECRET, algorithms=["HS256"], issuer=ISS, audience=AUD)
    assert verifier.verify(mint_token(HS_SECRET, "HS256", claims())).claims["sub"] == "alice"
    verifier_str = TokenVerifier(keys=HS_SECRET.decode(), algorithms=["HS256"])
    assert verifier_str.verify(mint_token(HS_SECRET, "HS256", claims())).claims["sub"] == "alice"


def test_certificate_pem_is_accepted(rsa_pair: tuple[Any, str]) -> None:
    private, _ = rsa_pair
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "idp.example")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(private, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    verifier = TokenVerifier(keys=cert_pem, algorithms=["RS256"])
    assert verifier.verify(mint_token(private, "RS256", claims())).claims["sub"] == "alice"


def test_bytes_token_accepted(rsa_pair: tuple[Any, str]) -> None:
    private, pem = rsa_pair
    token = mint_token(private, "RS256", claims())
    assert rs_verifier(pem).verify(token.encode("ascii")).claims["sub"] == "alice"  # type: ignore[arg-type]


def test_audience_none_accepts_token_with_aud(rsa_pair: tuple[Any, str]) -> None:
    private, pem = rsa_pair
    verifier = TokenVerifier(keys=pem, algorithms=["RS256"])
    assert verifier.verify(mint_token(private, "RS256", claims(aud="someone-else"))).claims["aud"]


def test_issuer_and_audience_lists(rsa_pair: tuple[Any, str]) -> None:
    private, pem = rsa_pair
    verifier = rs_verifier(pem, issuer=["https://other", ISS], audience=["x", AUD])
    assert verifier.verify(mint_token(private, "RS256", claims())).claims["sub"] == "alice"


def test_token_type_accepts_application_prefix(rsa_pair: tuple[Any, str]) -> None:
    private, pem = rsa_pair
    verifier = rs_verifier(pem, token_type="at+jwt")
    for typ in ("at+jwt", "AT+JWT", "application/at+jwt", "Application/AT+JWT"):
        token = mint_token(private, "RS256", claims(), {"typ": typ})
        assert verifier.verify(token).header["typ"] == typ


def test_several_keys_without_kid_are_each_tried(rsa_pair: tuple[Any, str], rsa_pair_2: tuple[Any, str]) -> None:
    verifier = TokenVerifier(keys=[rsa_pair[1], rsa_pair_2[1]], algorithms=["RS256"])
    for private in (rsa_pair[0], rsa_pair_2[0]):
        assert verifier.verify(mint_token(private, "RS256", claims())).claims["sub"] == "alice"


def test_key_dict_picks_by_kid(
    rsa_pair: tuple[Any, str], rsa_pair_2: tuple[Any, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    verifier = TokenVerifier(keys={"k1": rsa_pair[1], "k2": rsa_pair_2[1]}, algorithms=["RS256"], cache_size=0)
    spy = DecodeSpy(monkeypatch)
    assert verifier.verify(mint_token(rsa_pair_2[0], "RS256", claims(), {"kid": "k2"}))
    assert spy.calls == 1  # only the key named by the kid was tried
    with pytest.raises(InvalidToken, match="unknown kid"):
        verifier.verify(mint_token(rsa_pair[0], "RS256", claims(), {"kid": "k3"}))
    with pytest.raises(InvalidToken, match="signature verification failed"):
        verifier.verify(mint_token(rsa_pair[0], "RS256", claims(), {"kid": "k2"}))


def test_averify_inline_for_static_keys(rsa_pair: tuple[Any, str]) -> None:
    private, pem = rsa_pair
    verifier = rs_verifier(pem)
    token = mint_token(private, "RS256", claims())
    result = anyio.run(verifier.averify, token)
    assert result.claims["sub"] == "alice"
    assert anyio.run(verifier.averify, token) is result  # cache hit
    with pytest.raises(InvalidToken):
        anyio.run(verifier.averify, "nope")


# ---------------------------------------------------------------------------- cache


def test_cache_hit_does_not_reverify(rsa_pair: tuple[Any, str], monkeypatch: pytest.MonkeyPatch) -> None:
    private, pem = rsa_pair
    verifier = rs_verifier(pem)
    token = mint_token(private, "RS256", claims())
    spy = DecodeSpy(monkeypatch)
    first = verifier.verify(token)
    for _ in range(5):
        assert verifier.verify(token) is first
    assert spy.calls == 1


def test_cache_entry_dropped_at_exp(rsa_pair: tuple[Any, str], monkeypatch: pytest.MonkeyPatch) -> None:
    private, pem = rsa_pair
    clock = FakeClock(1_000_000.0)
    verifier = rs_verifier(pem, clock=clock)
    token = mint_token(private, "RS256", claims(iat=1_000_000, exp=1_000_060))
    spy = DecodeSpy(monkeypatch)
    verifier.verify(token)
    verifier.verify(token)
    assert spy.calls == 1
    clock.advance(60)  # exactly exp: the cache entry is gone, the leeway still accepts it on a full check
    verifier.verify(token)
    assert spy.calls == 2
    verifier.verify(token)
    assert spy.calls == 3  # past exp: never cached again
    clock.advance(11)  # beyond the 10 s leeway
    with pytest.raises(InvalidToken, match="token expired"):
        verifier.verify(token)


def test_cache_is_bounded(rsa_pair: tuple[Any, str], monkeypatch: pytest.MonkeyPatch) -> None:
    private, pem = rsa_pair
    verifier = rs_verifier(pem, cache_size=2)
    tokens = [mint_token(private, "RS256", claims(jti=f"t{i}")) for i in range(3)]
    spy = DecodeSpy(monkeypatch)
    for token in tokens:
        verifier.verify(token)
    assert spy.calls == 3
    verifier.verify(tokens[2])
    verifier.verify(tokens[1])
    assert spy.calls == 3  # the two most recent are cached
    verifier.verify(tokens[0])
    assert spy.calls == 4  # the oldest was evicted
    assert len(verifier._cache) == 2


def test_cache_disabled(rsa_pair: tuple[Any, str], monkeypatch: pytest.MonkeyPatch) -> None:
    private, pem = rsa_pair
    verifier = rs_verifier(pem, cache_size=0)
    token = mint_token(private, "RS256", claims())
    spy = DecodeSpy(monkeypatch)
    verifier.verify(token)
    verifier.verify(token)
    assert spy.calls == 2


def test_failures_are_not_cached(rsa_pair: tuple[Any, str], monkeypatch: pytest.MonkeyPatch) -> None:
    private, pem = rsa_pair
    clock = FakeClock(1_000_000.0)
    verifier = rs_verifier(pem, clock=clock)
    token = mint_token(private, "RS256", claims(iat=1_000_000, nbf=1_000_100, exp=1_000_600))
    with pytest.raises(InvalidToken, match="not yet valid"):
        verifier.verify(token)
    clock.advance(100)
    assert verifier.verify(token).claims["sub"] == "alice"


# ---------------------------------------------------------------------------- attacks


def _forge(alg: Any, signature: str = "", **header: Any) -> str:
    fields = {name: value for name, value in {"alg": alg, **TYP, **header}.items() if value is not _DROP}
    return f"{b64(fields)}.{b64(claims())}.{signature}"


def _signed(ctx: dict[str, Any], header: dict[str, Any] | None = None, **claim_overrides: Any) -> str:
    return mint_token(ctx["private"], "RS256", claims(**claim_overrides), {**TYP, **(header or {})})


def _flip_signature(token: str) -> str:
    head, payload, sig = token.split(".")
    middle = len(sig) // 2
    replacement = "A" if sig[middle] != "A" else "B"
    return f"{head}.{payload}.{sig[:middle]}{replacement}{sig[middle + 1 :]}"


def _hmac_with_public_pem(ctx: dict[str, Any]) -> str:
    signing_input = f"{b64({'alg': 'HS256', 'typ': 'at+jwt'})}.{b64(claims())}"
    mac = hmac.new(ctx["pem"].encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def _insert(token: str, position: int, text: str) -> str:
    return token[:position] + text + token[position:]


def _with_raw_header(ctx: dict[str, Any], raw_header: bytes, payload: bytes | None = None) -> str:
    body = b64(payload) if payload is not None else b64(claims())
    signing_input = f"{b64(raw_header)}.{body}"
    return f"{signing_input}.{_signed(ctx).split('.')[2]}"


Attack = Callable[[dict[str, Any]], Any]

ATTACKS: list[tuple[str, Attack]] = [
    # alg none, unsigned and with a fake signature
    *[(f"alg-{alg}-unsigned", lambda c, a=alg: _forge(a)) for alg in ("none", "None", "NONE", "nOnE")],
    *[(f"alg-{alg}-fake-sig", lambda c, a=alg: _forge(a, b64(b"sig"))) for alg in ("none", "None", "NONE")],
    ("alg-none-real-sig", lambda c: _forge("none", _signed(c).split(".")[2])),
    ("alg-missing", lambda c: f"{b64({'typ': 'at+jwt'})}.{b64(claims())}.{b64(b'sig')}"),
    ("alg-not-string", lambda c: _forge(["RS256"], b64(b"sig"))),
    ("alg-empty", lambda c: _forge("", b64(b"sig"))),
    ("alg-rs512-not-allowed", lambda c: mint_token(c["private"], "RS512", claims(), TYP)),
    # key confusion
    ("hs256-with-public-pem-as-secret", _hmac_with_public_pem),
    ("hs256-random-secret", lambda c: mint_token(b"x" * 32, "HS256", claims(), TYP)),
    # signature
    ("flipped-signature", lambda c: _flip_signature(_signed(c))),
    ("signature-of-another-token", lambda c: _signed(c).rsplit(".", 1)[0] + "." + _signed(c, sub="b").split(".")[2]),
    ("signed-by-other-key", lambda c: mint_token(c["other"], "RS256", claims(), TYP)),
    ("empty-signature", lambda c: _signed(c).rsplit(".", 1)[0] + "."),
    # characters outside base64url
    ("plus", lambda c: _insert(_signed(c), 20, "+")),
    ("slash", lambda c: _insert(_signed(c), 20, "/")),
    ("padding", lambda c: _signed(c) + "="),
    ("padding-in-header", lambda c: _insert(_signed(c), _signed(c).index("."), "==")),
    ("space", lambda c: _insert(_signed(c), 20, " ")),
    ("leading-space", lambda c: " " + _signed(c)),
    ("non-ascii", lambda c: _insert(_signed(c), 20, "é")),
    ("newline-end", lambda c: _signed(c) + "\n"),
    ("newline-middle", lambda c: _insert(_signed(c), 20, "\n")),
    ("tab", lambda c: _insert(_signed(c), 20, "\t")),
    ("nul", lambda c: _insert(_signed(c), 20, "\x00")),
    ("bytes-non-ascii", lambda c: _signed(c).encode() + b"\xff"),
    # size
    ("oversized", lambda c: _signed(c, blob="x" * 9000)),
    ("oversized-garbage", lambda c: "a" * 100000),
    ("oversized-bytes", lambda c: b"a" * 100000),
    # headers that would make us fetch or trust a key from the token
    ("jku", lambda c: _signed(c, {"jku": c["server"].url})),
    ("x5u", lambda c: _signed(c, {"x5u": c["server"].url})),
    ("jwk", lambda c: _signed(c, {"jwk": jwk_of(c["private"], "evil")})),
    ("x5c", lambda c: _signed(c, {"x5c": ["MIIB"]})),
    ("crit", lambda c: _forge("RS256", _signed(c).split(".")[2], crit=["exp"], exp=1)),
    # kid
    ("kid-traversal", lambda c: _signed(c, {"kid": "../../etc/passwd"})),
    ("kid-spaces", lambda c: _signed(c, {"kid": "a key"})),
    ("kid-500-chars", lambda c: _signed(c, {"kid": "k" * 500})),
    ("kid-sql", lambda c: _signed(c, {"kid": "x' OR '1'='1"})),
    ("kid-url", lambda c: _signed(c, {"kid": "https://evil/key"})),
    ("kid-empty", lambda c: _signed(c, {"kid": ""})),
    ("kid-int", lambda c: _forge("RS256", _signed(c).split(".")[2], kid=7)),
    ("kid-null", lambda c: _forge("RS256", _signed(c).split(".")[2], kid=None)),
    ("kid-list", lambda c: _forge("RS256", _signed(c).split(".")[2], kid=["a"])),
    # time
    ("expired", lambda c: _signed(c, iat=int(time.time()) - 600, exp=int(time.time()) - 60)),
    ("nbf-future", lambda c: _signed(c, nbf=int(time.time()) + 120)),
    ("iat-future", lambda c: _signed(c, iat=int(time.time()) + 120)),
    ("exp-string", lambda c: _signed(c, exp=str(int(time.time()) + 300))),
    ("exp-bool", lambda c: _signed(c, exp=True)),
    ("iat-string", lambda c: _signed(c, iat="now")),
    ("nbf-list", lambda c: _signed(c, nbf=[1])),
    ("exp-huge", lambda c: _signed(c, exp=10**400)),
    # issuer / audience / claims
    ("wrong-iss", lambda c: _signed(c, iss="https://evil.example")),
    ("missing-iss", lambda c: _signed(c, iss=_DROP)),
    ("wrong-aud", lambda c: _signed(c, aud="other-api")),
    ("missing-aud", lambda c: _signed(c, aud=_DROP)),
    ("aud-not-string", lambda c: _signed(c, aud=[1, 2])),
    ("missing-exp", lambda c: _signed(c, exp=_DROP)),
    ("missing-sub", lambda c: _signed(c, sub=_DROP)),
    ("missing-iat", lambda c: _signed(c, iat=_DROP)),
    ("sub-empty", lambda c: _signed(c, sub="")),
    ("sub-int", lambda c: _signed(c, sub=42)),
    ("jti-int", lambda c: _signed(c, jti=42)),
    # typ
    ("wrong-typ", lambda c: mint_token(c["private"], "RS256", claims(), {"typ": "JWT"})),
    ("missing-typ", lambda c: _forge("RS256", _signed(c).split(".")[2], typ=_DROP)),
    ("typ-not-string", lambda c: _signed(c, {"typ": 1})),
    # shape
    ("two-segments", lambda c: ".".join(_signed(c).split(".")[:2])),
    ("four-segments", lambda c: _signed(c) + ".AAAA"),
    ("empty-header", lambda c: "." + _signed(c).split(".", 1)[1]),
    ("empty-payload", lambda c: _signed(c).split(".")[0] + ".." + _signed(c).split(".")[2]),
    ("dots-only", lambda c: ".."),
    ("empty-string", lambda c: ""),
    ("garbage", lambda c: "not-a-token"),
    ("header-not-json", lambda c: _with_raw_header(c, b"{not json")),
    ("header-json-array", lambda c: _with_raw_header(c, b'["RS256"]')),
    ("header-deep-nesting", lambda c: _with_raw_header(c, b"[" * 1000 + b"]" * 1000)),
    ("payload-not-json", lambda c: _with_raw_header(c, b'{"alg":"RS256","typ":"at+jwt"}', b"{nope")),
    ("payload-array", lambda c: _with_raw_header(c, b'{"alg":"RS256","typ":"at+jwt"}', b"[1]")),
    ("bad-base64-length", lambda c: "A." + _signed(c).split(".", 1)[1]),
    # wrong input types
    ("int", lambda c: 12345),
    ("none", lambda c: None),
    ("list", lambda c: ["a.b.c"]),
    ("dict", lambda c: {"token": "a.b.c"}),
]


@pytest.fixture
def attack_ctx(rsa_pair: tuple[Any, str], rsa_pair_2: tuple[Any, str], server: JWKSServer) -> dict[str, Any]:
    server.jwks = {"keys": [jwk_of(rsa_pair[0], "evil")]}
    return {"private": rsa_pair[0], "pem": rsa_pair[1], "other": rsa_pair_2[0], "server": server}


def test_attack_context_baseline(attack_ctx: dict[str, Any]) -> None:
    """The untampered token built by the attack helpers is accepted, so each attack tests one change."""
    verifier = rs_verifier(attack_ctx["pem"], token_type="at+jwt")
    assert verifier.verify(_signed(attack_ctx)).claims["sub"] == "alice"


@pytest.mark.parametrize(("name", "build"), ATTACKS, ids=[name for name, _ in ATTACKS])
def test_attack_is_refused(name: str, build: Attack, attack_ctx: dict[str, Any]) -> None:
    verifier = rs_verifier(attack_ctx["pem"], token_type="at+jwt")
    token = build(attack_ctx)
    with pytest.raises(InvalidToken) as info:
        verifier.verify(token)
    with pytest.raises(InvalidToken):
        anyio.run(verifier.averify, token)
    message = str(info.value)
    assert message
    assert len(message) < 160
    if isinstance(token, str | bytes) and len(token) > 8:
        text = token.decode("latin-1") if isinstance(token, bytes) else token
        assert text not in message
        for segment in text.split("."):
            if len(segment) > 8:
                assert segment not in message
    assert attack_ctx["pem"] not in message
    assert attack_ctx["server"].hits == []  # nothing in a token makes us fetch anything


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        (lambda c: _forge("none"), "malformed token"),
        (lambda c: _forge("none", b64(b"sig")), "algorithm not allowed"),
        (_hmac_with_public_pem, "algorithm not allowed"),
        (lambda c: _flip_signature(_signed(c)), "signature verification failed"),
        (lambda c: _signed(c, blob="x" * 9000), "token too large"),
        (lambda c: _signed(c, {"jku": "https://evil"}), "unsupported header: jku"),
        (lambda c: _signed(c, {"kid": "../x"}), "invalid kid"),
        (lambda c: _signed(c, iat=int(time.time()) - 600, exp=int(time.time()) - 60), "token expired"),
        (lambda c: _signed(c, nbf=int(time.time()) + 120), "token not yet valid"),
        (lambda c: _signed(c, iat=int(time.time()) + 120), "issued in the future"),
        (lambda c: _signed(c, iss="x"), "wrong issuer"),
        (lambda c: _signed(c, aud="x"), "wrong audience"),
        (lambda c: _signed(c, sub=_DROP), "missing claim: sub"),
        (lambda c: _signed(c, exp=_DROP), "missing claim: exp"),
        (lambda c: mint_token(c["private"], "RS256", claims(), {"typ": "JWT"}), "wrong token type"),
        (lambda c: "a.b", "malformed token"),
    ],
)
def test_refusal_reasons(build: Attack, reason: str, attack_ctx: dict[str, Any]) -> None:
    verifier = rs_verifier(attack_ctx["pem"], token_type="at+jwt")
    with pytest.raises(InvalidToken) as info:
        verifier.verify(build(attack_ctx))
    assert str(info.value).startswith(reason)


def test_hs_verifier_refuses_rs_token(rsa_pair: tuple[Any, str]) -> None:
    verifier = TokenVerifier(keys=HS_SECRET, algorithms=["HS256"])
    with pytest.raises(InvalidToken, match="algorithm not allowed"):
        verifier.verify(mint_token(rsa_pair[0], "RS256", claims()))


def test_hs_signature_mismatch_message_is_safe() -> None:
    verifier = TokenVerifier(keys=HS_SECRET, algorithms=["HS256"])
    token = mint_token(b"y" * 32, "HS256", claims())
    with pytest.raises(InvalidToken) as info:
        verifier.verify(token)
    assert str(info.value) == "signature verification failed"
    assert HS_SECRET.decode() not in str(info.value)
    assert token not in str(info.value)
    assert info.value.__cause__ is None


def test_messages_never_contain_the_token(rsa_pair: tuple[Any, str]) -> None:
    private, pem = rsa_pair
    verifier = rs_verifier(pem)
    tokens = [
        mint_token(private, "RS256", claims(iss="wrong")),
        mint_token(private, "RS256", claims(sub=_DROP)),
        _flip_signature(mint_token(private, "RS256", claims())),
        mint_token(private, "RS256", claims(), {"kid": "k" * 200}),
        mint_token(private, "RS256", claims(), {"jku": "https://x"}),
    ]
    for token in tokens:
        with pytest.raises(InvalidToken) as info:
            verifier.verify(token)
        rendered = f"{info.value!s} {info.value!r}"
        for part in (token, *token.split(".")):
            assert part not in rendered


# ---------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "kwargs",
    [
        {"keys": "PEM", "algorithms": []},
        {"keys": HS_SECRET, "algorithms": ["none"]},
        {"keys": HS_SECRET, "algorithms": ["HS256", "NoNe"]},
        {"keys": HS_SECRET, "algorithms": ["HS256", "RS256"]},
        {"keys": HS_SECRET, "algorithms": "HS256"},
        {"keys": HS_SECRET, "algorithms": ["HS1"]},
        {"keys": HS_SECRET, "algorithms": ["hs256"]},
        {"keys": b"short", "algorithms": ["HS256"]},
        {"keys": b"s" * 32, "algorithms": ["HS512"]},
        {"keys": "", "algorithms": ["HS256"]},
        {"keys": [], "algorithms": ["HS256"]},
        {"algorithms": ["RS256"]},
        {"keys": HS_SECRET, "jwks": {"keys": []}, "algorithms": ["HS256"]},
        {"keys": "a-plain-string-secret-that-is-long-enough-for-hs", "algorithms": ["RS256"]},
        {"keys": b"-----BEGIN PUBLIC KEY-----\nnot really\n-----END PUBLIC KEY-----\n", "algorithms": ["RS256"]},
        {"keys": HS_SECRET, "algorithms": ["HS256"], "leeway": -1},
        {"keys": HS_SECRET, "algorithms": ["HS256"], "max_token_bytes": 0},
        {"keys": HS_SECRET, "algorithms": ["HS256"], "cache_size": -1},
        {"keys": HS_SECRET, "algorithms": ["HS256"], "jwks_refresh_interval": 0},
        {"keys": HS_SECRET, "algorithms": ["HS256"], "required_claims": "sub"},
        {"keys": HS_SECRET, "algorithms": ["HS256"], "issuer": ""},
        {"keys": HS_SECRET, "algorithms": ["HS256"], "audience": []},
        {"jwks": {"keys": []}, "algorithms": ["RS256"]},
        {"jwks": {"nokeys": 1}, "algorithms": ["RS256"]},
        {"jwks_url": "file:///etc/passwd", "algorithms": ["RS256"]},
        {"jwks_url": "", "algorithms": ["RS256"]},
    ],
)
def test_configuration_errors(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        TokenVerifier(**kwargs)


def test_pem_as_hs_secret_refused(rsa_pair: tuple[Any, str]) -> None:
    with pytest.raises(ConfigurationError, match="key confusion"):
        TokenVerifier(keys=rsa_pair[1], algorithms=["HS256"])
    ssh = rsa_pair[0].public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    with pytest.raises(ConfigurationError, match="key confusion"):
        TokenVerifier(keys=ssh + b" " * 40, algorithms=["HS256"])


def test_key_family_must_match(rsa_pair: tuple[Any, str]) -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(ConfigurationError):
        TokenVerifier(keys=pem_of(ec_key), algorithms=["RS256"])
    with pytest.raises(ConfigurationError):
        TokenVerifier(keys=rsa_pair[1], algorithms=["ES256"])
    with pytest.raises(ConfigurationError):
        TokenVerifier(keys=pem_of(ec.generate_private_key(ec.SECP384R1())), algorithms=["ES256"])
    with pytest.raises(ConfigurationError):
        TokenVerifier(keys=pem_of(ed25519.Ed25519PrivateKey.generate()), algorithms=["RS256"])
    with pytest.raises(ConfigurationError):
        TokenVerifier(keys=rsa_pair[0].public_key(), algorithms=["HS256"])


def test_small_rsa_key_refused() -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(ConfigurationError):
        TokenVerifier(keys=pem_of(small), algorithms=["RS256"])


def test_exp_is_always_required(rsa_pair: tuple[Any, str]) -> None:
    private, pem = rsa_pair
    verifier = TokenVerifier(keys=pem, algorithms=["RS256"], required_claims=("sub",))
    with pytest.raises(InvalidToken, match="missing claim: exp"):
        verifier.verify(mint_token(private, "RS256", claims(exp=_DROP)))
    assert verifier.verify(mint_token(private, "RS256", claims(iat=_DROP))).claims["sub"] == "alice"


# ---------------------------------------------------------------------------- JWKS


def test_jwks_dict_picks_by_kid(
    rsa_pair: tuple[Any, str], rsa_pair_2: tuple[Any, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    jwks = {"keys": [jwk_of(rsa_pair[0], "a", use="sig", alg="RS256"), jwk_of(rsa_pair_2[0], "b")]}
    verifier = TokenVerifier(jwks=jwks, algorithms=["RS256"], cache_size=0)
    spy = DecodeSpy(monkeypatch)
    assert verifier.verify(mint_token(rsa_pair[0], "RS256", claims(), {"kid": "a"})).claims["sub"] == "alice"
    assert verifier.verify(mint_token(rsa_pair_2[0], "RS256", claims(), {"kid": "b"})).claims["sub"] == "alice"
    assert spy.calls == 2
    with pytest.raises(InvalidToken, match="signature verification failed"):
        verifier.verify(mint_token(rsa_pair[0], "RS256", claims(), {"kid": "b"}))
    with pytest.raises(InvalidToken, match="unknown kid"):
        verifier.verify(mint_token(rsa_pair[0], "RS256", claims(), {"kid": "c"}))


def test_jwks_skips_non_sig_and_disallowed_alg_keys(rsa_pair: tuple[Any, str], rsa_pair_2: tuple[Any, str]) -> None:
    jwks = {
        "keys": [
            jwk_of(rsa_pair[0], "enc", use="enc"),
            jwk_of(rsa_pair[0], "rs512", alg="RS512"),
            jwk_of(rsa_pair_2[0], "ok"),
            {"kty": "oct", "k": b64(b"x" * 32), "kid": "sym"},
        ]
    }
    verifier = TokenVerifier(jwks=jwks, algorithms=["RS256"])
    for kid in ("enc", "rs512", "sym"):
        with pytest.raises(InvalidToken):
            verifier.verify(mint_token(rsa_pair[0], "RS256", claims(), {"kid": kid}))
    assert verifier.verify(mint_token(rsa_pair_2[0], "RS256", claims(), {"kid": "ok"}))


def test_jwks_explicit_alg_binds_the_key(rsa_pair: tuple[Any, str]) -> None:
    jwks = {"keys": [jwk_of(rsa_pair[0], "a", alg="PS256")]}
    verifier = TokenVerifier(jwks=jwks, algorithms=["RS256", "PS256"])
    assert verifier.verify(mint_token(rsa_pair[0], "PS256", claims(), {"kid": "a"}))
    with pytest.raises(InvalidToken, match="no matching key"):
        verifier.verify(mint_token(rsa_pair[0], "RS256", claims(), {"kid": "a"}))


def test_jwks_url_fetches_once_and_rate_limits_unknown_kids(
    rsa_pair: tuple[Any, str], rsa_pair_2: tuple[Any, str], server: JWKSServer
) -> None:
    server.jwks = {"keys": [jwk_of(rsa_pair[0], "a")]}
    clock = FakeClock()
    verifier = TokenVerifier(jwks_url=server.url, algorithms=["RS256"], clock=clock, jwks_refresh_interval=60)
    assert server.hits == []  # nothing fetched at construction

    def token(private: Any, kid: str) -> str:
        now = int(clock())
        return mint_token(private, "RS256", claims(iat=now, exp=now + 3600), {"kid": kid})

    assert verifier.verify(token(rsa_pair[0], "a")).claims["sub"] == "alice"
    assert len(server.hits) == 1
    assert verifier.verify(token(rsa_pair[0], "a")) is not None
    assert len(server.hits) == 1

    # Unknown kids within the interval: no fetch at all.
    for i in range(20):
        with pytest.raises(InvalidToken, match="unknown kid"):
            verifier.verify(token(rsa_pair_2[0], f"x{i}"))
    assert len(server.hits) == 1

    # After the interval: exactly one refetch, however many unknown kids arrive.
    clock.advance(61)
    for i in range(20):
        with pytest.raises(InvalidToken, match="unknown kid"):
            verifier.verify(token(rsa_pair_2[0], f"y{i}"))
    assert len(server.hits) == 2

    # Key rotation: the new key is picked up on the next allowed refresh.
    server.jwks = {"keys": [jwk_of(rsa_pair[0], "a"), jwk_of(rsa_pair_2[0], "b")]}
    with pytest.raises(InvalidToken, match="unknown kid"):
        verifier.verify(token(rsa_pair_2[0], "b"))
    assert len(server.hits) == 2
    clock.advance(60)
    assert verifier.verify(token(rsa_pair_2[0], "b")).claims["sub"] == "alice"
    assert len(server.hits) == 3


def jwks_url_verifier(server: JWKSServer, private: Any, **options: Any) -> tuple[FakeClock, TokenVerifier, str]:
    """A verifier of ``server``'s JWKS URL on a fake clock, and a token signed with ``private`` (kid ``a``)."""
    clock = FakeClock()
    verifier = TokenVerifier(jwks_url=server.url, algorithms=["RS256"], clock=clock, **options)
    now = int(clock())
    return clock, verifier, mint_token(private, "RS256", claims(iat=now, exp=now + 3600), {"kid": "a"})


def test_jwks_url_refreshes_after_lifespan(rsa_pair: tuple[Any, str], server: JWKSServer) -> None:
    server.jwks = {"keys": [jwk_of(rsa_pair[0], "a")]}
    clock, verifier, tok = jwks_url_verifier(server, rsa_pair[0], cache_size=0)
    verifier.verify(tok)
    clock.advance(299)
    verifier.verify(tok)
    assert len(server.hits) == 1
    clock.advance(2)
    verifier.verify(tok)
    assert len(server.hits) == 2


def test_jwks_url_fetch_failure_fails_closed(rsa_pair: tuple[Any, str], server: JWKSServer) -> None:
    server.status = 500
    clock, verifier, tok = jwks_url_verifier(server, rsa_pair[0])
    for _ in range(5):
        with pytest.raises(KeysUnavailable) as info:
            verifier.verify(tok)
        assert str(info.value) == "signing keys unavailable"
        assert info.value.retry_after == 1
    assert len(server.hits) == 1  # failures are rate-limited too
    server.status = 200
    server.jwks = {"keys": [jwk_of(rsa_pair[0], "a")]}
    clock.advance(1)  # a failed fetch is retried soon
    assert verifier.verify(tok).claims["sub"] == "alice"
    assert len(server.hits) == 2


def test_jwks_url_keeps_last_good_set_for_a_while(rsa_pair: tuple[Any, str], server: JWKSServer) -> None:
    server.jwks = {"keys": [jwk_of(rsa_pair[0], "a")]}
    clock, verifier, tok = jwks_url_verifier(server, rsa_pair[0], cache_size=0)
    verifier.verify(tok)
    server.status = 500
    clock.advance(301)  # stale: refresh fails, the previous set still serves
    verifier.verify(tok)
    assert len(server.hits) == 2
    clock.advance(300)  # older than two lifetimes: fail closed
    with pytest.raises(InvalidToken, match="signing keys unavailable"):
        verifier.verify(tok)


def test_jwks_url_unreachable(rsa_pair: tuple[Any, str]) -> None:
    with socket_port() as port:
        verifier = TokenVerifier(jwks_url=f"http://127.0.0.1:{port}/jwks.json", algorithms=["RS256"])
    tok = mint_token(rsa_pair[0], "RS256", claims(), {"kid": "a"})
    with pytest.raises(InvalidToken, match="signing keys unavailable"):
        verifier.verify(tok)


def test_averify_fetches_off_the_event_loop(rsa_pair: tuple[Any, str], server: JWKSServer) -> None:
    server.jwks = {"keys": [jwk_of(rsa_pair[0], "a")]}
    verifier = TokenVerifier(jwks_url=server.url, algorithms=["RS256"])
    client = verifier._jwks_client
    assert client is not None
    fetch_threads: list[int] = []
    real = client.get_jwk_set

    def spy(refresh: bool = False) -> Any:
        fetch_threads.append(threading.get_ident())
        return real(refresh)

    client.get_jwk_set = spy  # type: ignore[method-assign]
    tok = mint_token(rsa_pair[0], "RS256", claims(), {"kid": "a"})

    async def main() -> tuple[int, VerifiedToken, VerifiedToken]:
        first = await verifier.averify(tok)
        second = await verifier.averify(mint_token(rsa_pair[0], "RS256", claims(jti="2"), {"kid": "a"}))
        return threading.get_ident(), first, second

    loop_thread, first, second = anyio.run(main)
    assert first.claims["sub"] == second.claims["sub"] == "alice"
    assert len(fetch_threads) == 1
    assert fetch_threads[0] != loop_thread


class socket_port:
    """Reserve a free local port and release it, so nothing listens there."""

    def __enter__(self) -> int:
        import socket

        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        port: int = self._sock.getsockname()[1]
        return port

    def __exit__(self, *exc: object) -> None:
        self._sock.close()


# ---------------------------------------------------------------------------- issuer key rotation and outages


def _kid_token(clock: FakeClock, private: Any, kid: str, **extra: Any) -> str:
    now = int(clock())
    return mint_token(private, "RS256", claims(iat=now, exp=now + 3600, **extra), {"kid": kid})


def test_unknown_kid_refetches_after_a_short_floor_and_a_flood_stays_bounded(
    rsa_pair: tuple[Any, str], rsa_pair_2: tuple[Any, str], server: JWKSServer
) -> None:
    server.jwks = {"keys": [jwk_of(rsa_pair[0], "a")]}
    clock = FakeClock()
    verifier = TokenVerifier(jwks_url=server.url, algorithms=["RS256"], clock=clock)  # floor: 5 s by default
    verifier.verify(_kid_token(clock, rsa_pair[0], "a"))
    server.jwks = {"keys": [jwk_of(rsa_pair[0], "a"), jwk_of(rsa_pair_2[0], "b")]}  # the issuer adds a key
    clock.advance(5)
    assert verifier.verify(_kid_token(clock, rsa_pair_2[0], "b")).claims["sub"] == "alice"
    assert len(server.hits) == 2
    for i in range(1000):  # 1,000 forged kids over 10 s: at most one fetch per 5 s
        with pytest.raises(InvalidToken, match="unknown kid"):
            verifier.verify(_kid_token(clock, rsa_pair_2[0], f"forged{i}"))
        if i % 100 == 99:
            clock.advance(1)
    assert len(server.hits) == 3  # one more fetch, 5 s after the last one


def test_concurrent_first_verifications_share_one_fetch(rsa_pair: tuple[Any, str], server: JWKSServer) -> None:
    server.jwks = {"keys": [jwk_of(rsa_pair[0], "a")]}
    verifier = TokenVerifier(jwks_url=server.url, algorithms=["RS256"], cache_size=0)
    tokens = [mint_token(rsa_pair[0], "RS256", claims(jti=str(i)), {"kid": "a"}) for i in range(16)]
    barrier = threading.Barrier(len(tokens))
    subs: list[str] = []

    def run(tok: str) -> None:
        barrier.wait()
        subs.append(verifier.verify(tok).claims["sub"])

    threads = [threading.Thread(target=run, args=(t,)) for t in tokens]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert subs == ["alice"] * len(tokens)
    assert len(server.hits) == 1


def test_outage_at_start_then_recovery(rsa_pair: tuple[Any, str], server: JWKSServer) -> None:
    server.status = 503
    clock, verifier, tok = jwks_url_verifier(server, rsa_pair[0])
    with pytest.raises(KeysUnavailable):
        verifier.verify(tok)
    with pytest.raises(KeysUnavailable):  # within the retry delay: no fetch, no I/O
        anyio.run(verifier.averify, tok)
    assert len(server.hits) == 1
    server.status = 200
    server.jwks = {"keys": [jwk_of(rsa_pair[0], "a")]}
    clock.advance(1)
    assert anyio.run(verifier.averify, tok).claims["sub"] == "alice"
    assert len(server.hits) == 2


def test_drop_key_refuses_it_and_forgets_its_cached_tokens(
    rsa_pair: tuple[Any, str], rsa_pair_2: tuple[Any, str], server: JWKSServer
) -> None:
    server.jwks = {"keys": [jwk_of(rsa_pair[0], "a"), jwk_of(rsa_pair_2[0], "b")]}
    clock = FakeClock()
    verifier = TokenVerifier(jwks_url=server.url, algorithms=["RS256"], clock=clock)
    tok_a, tok_b = _kid_token(clock, rsa_pair[0], "a"), _kid_token(clock, rsa_pair_2[0], "b")
    verifier.verify(tok_a)
    verifier.verify(tok_b)
    assert verifier.drop_key("a") == 1
    assert verifier.dropped_keys == {"a"}
    for tok in (tok_a, _kid_token(clock, rsa_pair[0], "a", jti="fresh")):
        with pytest.raises(InvalidToken, match="signing key withdrawn"):
            verifier.verify(tok)
    with pytest.raises(InvalidToken):  # a kid-less token is not verified by the dropped key either
        verifier.verify(mint_token(rsa_pair[0], "RS256", claims(iat=int(clock()), exp=int(clock()) + 60)))
    assert verifier.verify(tok_b).claims["sub"] == "alice"
    with pytest.raises(ConfigurationError):
        verifier.drop_key("../x")


def test_a_key_removed_by_the_issuer_stops_verifying_after_a_refresh(
    rsa_pair: tuple[Any, str], rsa_pair_2: tuple[Any, str], server: JWKSServer
) -> None:
    server.jwks = {"keys": [jwk_of(rsa_pair[0], "a"), jwk_of(rsa_pair_2[0], "b")]}
    clock = FakeClock()
    verifier = TokenVerifier(jwks_url=server.url, algorithms=["RS256"], clock=clock, jwks_ttl=30)
    tok_a = _kid_token(clock, rsa_pair[0], "a")
    verifier.verify(tok_a)  # cached
    server.jwks = {"keys": [jwk_of(rsa_pair_2[0], "b")]}
    assert verifier.refresh_keys() == 1
    with pytest.raises(InvalidToken, match="unknown kid"):  # the cache forgot it
        verifier.verify(tok_a)
    server.jwks = {"keys": [jwk_of(rsa_pair[0], "a")]}
    clock.advance(30)  # jwks_ttl: the next verification refetches
    assert verifier.verify(tok_a).claims["sub"] == "alice"
    server.status = 500
    with pytest.raises(KeysUnavailable):
        verifier.refresh_keys()
    with pytest.raises(ConfigurationError, match="jwks_ttl"):
        TokenVerifier(jwks_url=server.url, algorithms=["RS256"], jwks_ttl=1, jwks_refresh_interval=5)


def test_a_token_from_the_future_names_the_clock_skew(rsa_pair: tuple[Any, str]) -> None:
    private, pem = rsa_pair
    clock = FakeClock(1_000_000.0)
    verifier = rs_verifier(pem, clock=clock, leeway=10)
    for name in ("nbf", "iat"):
        tok = mint_token(private, "RS256", claims(**{"iat": 1_000_000, name: 1_000_030, "exp": 1_000_600}))
        with pytest.raises(InvalidToken) as info:
            verifier.verify(tok)
        assert f"for another 20 s ({name})" in str(info.value)
        assert "clock may be ahead" in str(info.value) and "leeway is 10 s" in str(info.value)
    clock.advance(20)
    assert verifier.verify(tok).claims["sub"] == "alice"


def test_async_verifications_during_the_first_fetch_wait_for_it(rsa_pair: tuple[Any, str]) -> None:
    # the JWKS answers only once the second verification has started: it must wait for the fetch, not fail
    answer = threading.Event()
    jwks = {"keys": [jwk_of(rsa_pair[0], "a")]}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            answer.wait(10)
            body = json.dumps(jwks).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        verifier = TokenVerifier(jwks_url=f"http://127.0.0.1:{httpd.server_address[1]}/", algorithms=["RS256"])
        tokens = [mint_token(rsa_pair[0], "RS256", claims(jti=str(i)), {"kid": "a"}) for i in range(2)]
        real_verify = verifier.verify

        def verify(token: str, *, fetch: bool = True) -> VerifiedToken:
            if token == tokens[1]:
                answer.set()  # the second verification has started (in a worker thread, or inline)
            return real_verify(token, fetch=fetch)

        verifier.verify = verify  # type: ignore[method-assign]

        async def second() -> VerifiedToken:
            while not verifier._jwks_fetching:  # the first verification's fetch is running
                await anyio.sleep(0.001)
            return await verifier.averify(tokens[1])

        async def main() -> list[str]:
            results: list[str] = []

            async def run(coro: Any) -> None:
                results.append((await coro).claims["sub"])

            async with anyio.create_task_group() as tg:
                tg.start_soon(run, verifier.averify(tokens[0]))
                tg.start_soon(run, second())
            return results

        assert anyio.run(main) == ["alice", "alice"]
    finally:
        httpd.shutdown()
