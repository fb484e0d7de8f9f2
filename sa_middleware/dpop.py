"""Sender-constrained tokens: DPoP proofs (RFC 9449) and certificate-bound tokens (RFC 8705).

A sender-constrained token names, in its ``cnf`` claim (RFC 7800), the key of the one client allowed to use it:
``cnf.jkt`` is the RFC 7638 thumbprint of a DPoP key, ``cnf.x5t#S256`` the SHA-256 thumbprint of a TLS client
certificate. :class:`SenderConstraints` checks, for one request, that the client proved possession of that key, and
returns the keys the request proved (:class:`Binding`), which become part of the client's identity for the reuse
check (``token_reuse``). Everything here is pure: no I/O, no state.

The rules (the "Tokens and sender constraints" page of the documentation):

- A DPoP-bound token (``cnf.jkt``) must come as ``Authorization: DPoP <token>`` (a ``Bearer`` presentation is refused,
  RFC 9449 section 7.2) with exactly one valid ``DPoP`` proof header (section 4.3): ``typ`` ``dpop+jwt``; an
  asymmetric ``alg`` from ``dpop_algorithms``; a public ``jwk`` in the header (no private members) that verifies the
  signature; ``htm`` = the request method; ``htu`` = the request URI without query and fragment (scheme, host and
  port from the request, compared after RFC 3986 normalisation of case, default ports and percent-encoding);
  ``iat`` within ``max_age`` (plus ``leeway``) in the past and ``leeway`` in the future; a ``jti``; and ``ath`` =
  base64url(SHA-256(access token)). A missing or failing proof is ``invalid_token`` (challenge
  ``DPoP error="invalid_dpop_proof"``); a valid proof by another key than ``cnf.jkt`` is ``token_reuse``: the
  token is being used by a client that does not hold its key.
- The ``DPoP`` scheme with a token that is not DPoP-bound is ``invalid_token`` (nothing would be proven).
- A ``Bearer`` token that is not bound may still come with a DPoP proof: the proof must then be valid too (fail
  closed), and its key joins the client's identity.
- A certificate-bound token (``cnf.x5t#S256``) needs the TLS client certificate, as the server reports it (ASGI
  ``tls`` extension ``client_cert_chain[0]``; WSGI ``SSL_CLIENT_CERT``, which werkzeug and mod_ssl set): none is
  ``invalid_token``, another certificate is ``token_reuse``.
- DPoP proof ``jti`` values are required but not remembered: a captured proof can be replayed with its token, for
  the same method and URI, within the ``iat`` window. Keep ``max_age`` short.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import re
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final
from urllib.parse import unquote_to_bytes, urlsplit

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from jwt.api_jws import PyJWS

from .context import RequestInfo
from .denials import Denial
from .errors import ConfigurationError, InvalidToken
from .frozen import fast_init
from .operations import finite_number

__all__ = [
    "DEFAULT_DPOP_ALGORITHMS", "UNBOUND", "Binding", "DPoPVerifier", "InvalidDPoPProof", "Proof", "SenderConstraints",
    "access_token_hash", "certificate_thumbprint", "jwk_thumbprint",
]

#: the asymmetric JWS algorithms accepted for DPoP proofs unless ``dpop_algorithms`` says otherwise
DEFAULT_DPOP_ALGORITHMS: Final[tuple[str, ...]] = ("ES256", "ES384", "ES512", "EdDSA", "PS256", "PS384", "PS512",
                                                   "RS256", "RS384", "RS512")
_KTY: Final[dict[str, str]] = {
    "ES256": "EC", "ES384": "EC", "ES512": "EC", "EdDSA": "OKP",
    **dict.fromkeys(("PS256", "PS384", "PS512", "RS256", "RS384", "RS512"), "RSA"),
}
_EC_CURVES: Final[dict[str, str]] = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}
_THUMBPRINT_MEMBERS: Final[dict[str, tuple[str, ...]]] = {  # RFC 7638 section 3.2, in lexicographic order
    "EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n"), "OKP": ("crv", "kty", "x")}
_PRIVATE_MEMBERS: Final = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
_REFUSED_HEADERS: Final = ("crit", "b64")  # no extension is understood; unencoded payloads (RFC 7797) never
_MIN_RSA_BITS: Final = 2048
_MAX_PROOF_BYTES: Final = 8192
_MAX_ID: Final = 256
_JWS_SHAPE: Final = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
_HTTP_SCHEMES: Final = {"http": "http", "https": "https", "ws": "http", "wss": "https"}
_JWS: Final = PyJWS()


class InvalidDPoPProof(InvalidToken):
    """A DPoP proof failed verification (RFC 9449 section 4.3). The message is safe to show."""


@fast_init
@dataclass(frozen=True, slots=True)
class Proof:
    """A verified DPoP proof: the RFC 7638 thumbprint of its key, its ``jti`` and ``iat``."""

    jkt: str
    jti: str
    iat: float


@fast_init
@dataclass(frozen=True, slots=True)
class Binding:
    """The keys a request proved it holds: a DPoP proof's key (``jkt``), a TLS client certificate (``x5t``)."""

    jkt: str | None = None
    x5t: str | None = None

    def client(self, address: str) -> str:
        """The client part of the identity the reuse check compares: the address, then the proven keys.

        The stores compare ``"<this>|<user agent>"``; the user agent (client-chosen, may contain ``|``) comes after
        the first ``|``, and this part never contains one, so no user agent can pose as a proven key.
        """
        if not self.jkt and not self.x5t:
            return address.replace("|", "/")
        keys = [f"{name}:{value}" for name, value in (("jkt", self.jkt), ("x5t", self.x5t)) if value]
        return " ".join([address.replace("|", "/"), *keys])


#: the binding of a request that proved no key: a bearer token bound to nothing
UNBOUND = Binding()


# -- thumbprints and hashes ----------------------------------------------------------------------------------------

def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """The RFC 7638 SHA-256 thumbprint of a JWK (``EC``, ``RSA`` or ``OKP``), base64url without padding."""
    kty = jwk.get("kty")
    members = _THUMBPRINT_MEMBERS.get(kty) if isinstance(kty, str) else None
    if members is None:
        raise InvalidDPoPProof("jwk: unsupported key type")
    if not all(isinstance(jwk.get(name), str) and jwk[name].isascii() for name in members):
        raise InvalidDPoPProof("jwk: missing or malformed members")
    canonical = json.dumps({name: jwk[name] for name in members}, separators=(",", ":"), ensure_ascii=False)
    return _b64(hashlib.sha256(canonical.encode("utf-8")).digest())


def certificate_thumbprint(pem: str) -> str:
    """The RFC 8705 ``x5t#S256`` of a PEM certificate: base64url(SHA-256(DER)). Raises ValueError if malformed."""
    return _b64(hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).digest())


def access_token_hash(token: str) -> str:
    """The DPoP ``ath`` of an access token: base64url(SHA-256(ASCII of the token)), RFC 9449 section 4.2."""
    return _b64(hashlib.sha256(token.encode("ascii")).digest())


# -- DPoP proofs ---------------------------------------------------------------------------------------------------

class DPoPVerifier:
    """Verifies one DPoP proof against the request it came with (RFC 9449 section 4.3, without nonces)."""

    def __init__(self, *, algorithms: Sequence[str] = DEFAULT_DPOP_ALGORITHMS, max_age: float = 60.0,
                 leeway: float = 10.0, clock: Callable[[], float] = time.time) -> None:
        if isinstance(algorithms, str) or not isinstance(algorithms, Sequence) or not algorithms:
            raise ConfigurationError("dpop_algorithms must be a non-empty list of asymmetric JWS algorithm names")
        for alg in algorithms:
            if alg not in _KTY:
                raise ConfigurationError(f"dpop_algorithms: {alg!r} is not an asymmetric JWS algorithm; "
                                         f"known: {sorted(_KTY)}")
        for name, value in (("dpop_max_age", max_age), ("leeway", leeway)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
                    or value < 0 or (name == "dpop_max_age" and value == 0):
                raise ConfigurationError(f"{name} must be a positive, finite number of seconds")
        self.algorithms: tuple[str, ...] = tuple(dict.fromkeys(algorithms))
        self.max_age = float(max_age)
        self.leeway = float(leeway)
        self._clock = clock

    def verify(self, proof: str, request: RequestInfo, access_token: str) -> Proof:
        """Check ``proof`` (the ``DPoP`` header's value) for ``request`` presenting ``access_token``."""
        try:
            return self._verify(proof, request, access_token)
        except InvalidDPoPProof:
            raise
        except Exception:  # a backstop: whatever a hostile proof makes fail is a refused proof, never a 500
            raise InvalidDPoPProof("malformed proof") from None

    def _verify(self, proof: str, request: RequestInfo, access_token: str) -> Proof:
        if "," in proof:  # servers join repeated header fields with commas; a JWS never contains one
            raise InvalidDPoPProof("more than one DPoP header")
        proof = proof.strip()
        if len(proof) > _MAX_PROOF_BYTES:
            raise InvalidDPoPProof("the proof is too large")
        if not _JWS_SHAPE.fullmatch(proof):
            raise InvalidDPoPProof("the proof is not a compact JWS")
        header = _json_object(proof.split(".", 1)[0], "header")
        typ = header.get("typ")
        if not isinstance(typ, str) or typ.lower() != "dpop+jwt":
            raise InvalidDPoPProof("typ must be dpop+jwt")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise InvalidDPoPProof("algorithm not allowed")
        if any(name in header for name in _REFUSED_HEADERS):
            raise InvalidDPoPProof("unsupported header parameter")
        jwk = header.get("jwk")
        if not isinstance(jwk, dict):
            raise InvalidDPoPProof("the header must carry the public key as jwk")
        key = _public_key(jwk, alg)
        try:
            payload = _JWS.decode_complete(proof, key=key, algorithms=[alg])["payload"]
        except (jwt.PyJWTError, ValueError, TypeError):
            raise InvalidDPoPProof("signature verification failed") from None
        claims = _json_payload(payload)
        jti, htm, htu, iat, ath = (claims.get(n) for n in ("jti", "htm", "htu", "iat", "ath"))
        if not isinstance(jti, str) or not jti or len(jti) > _MAX_ID:
            raise InvalidDPoPProof("missing or malformed claim: jti")
        if not isinstance(htm, str) or htm != request.method:
            raise InvalidDPoPProof("htm does not match the request method")
        if not isinstance(htu, str) or not _same_uri(htu, request):
            raise InvalidDPoPProof("htu does not match the request URI")
        iat = finite_number(iat)  # None for a bool, a non-number, an integer too large for a float
        if iat is None:
            raise InvalidDPoPProof("missing or malformed claim: iat")
        now = self._clock()
        if iat > now + self.leeway:
            raise InvalidDPoPProof("the proof was issued in the future")
        if iat < now - self.max_age - self.leeway:
            raise InvalidDPoPProof("the proof is too old")
        if not isinstance(ath, str) or not hmac.compare_digest(ath.encode("ascii", "replace"),
                                                               access_token_hash(access_token).encode("ascii")):
            raise InvalidDPoPProof("ath does not match the access token")
        return Proof(jwk_thumbprint(jwk), jti, float(iat))


def _json_object(segment: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(_unb64(segment))
    except (binascii.Error, ValueError, RecursionError):
        raise InvalidDPoPProof(f"malformed {what}") from None
    if not isinstance(value, dict):
        raise InvalidDPoPProof(f"malformed {what}")
    return value


def _json_payload(payload: bytes) -> dict[str, Any]:
    try:
        value = json.loads(payload)
    except (ValueError, RecursionError):
        raise InvalidDPoPProof("malformed payload") from None
    if not isinstance(value, dict):
        raise InvalidDPoPProof("malformed payload")
    return value


def _public_key(jwk: dict[str, Any], alg: str) -> Any:
    """The public key of a proof's ``jwk``, of the family (and curve) ``alg`` needs."""
    if _PRIVATE_MEMBERS & jwk.keys():
        raise InvalidDPoPProof("the jwk must be a public key")
    kty = _KTY[alg]
    if jwk.get("kty") != kty:
        raise InvalidDPoPProof(f"{alg} needs a {kty} key")
    jwk_thumbprint(jwk)  # the members it needs are there and are strings
    loaders: dict[str, Callable[[dict[str, Any]], Any]] = {
        "EC": ECAlgorithm.from_jwk, "RSA": RSAAlgorithm.from_jwk, "OKP": OKPAlgorithm.from_jwk}
    try:
        key = loaders[kty](jwk)
    except (jwt.PyJWTError, ValueError, TypeError, KeyError, binascii.Error):
        raise InvalidDPoPProof("invalid jwk") from None
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name != _EC_CURVES[alg]:
        raise InvalidDPoPProof(f"{alg} needs a key on another curve")
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < _MIN_RSA_BITS:
        raise InvalidDPoPProof(f"RSA keys must be at least {_MIN_RSA_BITS} bits")
    if not hasattr(key, "verify") or hasattr(key, "private_bytes"):
        raise InvalidDPoPProof("the jwk must be a public key")
    return key


def _same_uri(htu: str, request: RequestInfo) -> bool:
    """Whether ``htu`` names the request's URI, ignoring query and fragment (RFC 9449 section 4.3, RFC 3986
    section 6.2.2-6.2.3: case of scheme and host, default ports, an empty path, percent-encoding)."""
    try:
        want = urlsplit(htu)
        got = urlsplit(f"//{request.host}")
        scheme = _HTTP_SCHEMES.get(want.scheme.lower())
        if scheme is None or scheme != _HTTP_SCHEMES.get(request.scheme.lower()):
            return False
        if want.username is not None or want.password is not None or not want.hostname or not got.hostname:
            return False
        if want.hostname != got.hostname:
            return False
        if (want.port or _DEFAULT_PORTS[scheme]) != (got.port or _DEFAULT_PORTS[scheme]):
            return False
        path = unquote_to_bytes(want.path or "/")
    except ValueError:  # a malformed port or authority, on either side; a lone surrogate in the path
        return False
    here = request.path or "/"
    # ASGI gives the path as decoded text, WSGI as its bytes decoded as latin-1 (PEP 3333): the bytes must match
    return path in {_encoded(here, "utf-8"), _encoded(here, "latin-1")}


def _encoded(text: str, encoding: str) -> bytes | None:
    try:
        return text.encode(encoding)
    except UnicodeEncodeError:
        return None


# -- the checks of one request -------------------------------------------------------------------------------------

class SenderConstraints:
    """Decides whether a request may use its token under the token's ``cnf`` binding (see the module docstring).

    ``mode="verify"`` (default) checks DPoP proofs and client certificates here; ``mode="upstream"`` is for a
    gateway in front that already did (RFC 9449 / RFC 8705): then both schemes are accepted, proofs are not read,
    and ``cnf`` serves only to relate contexts.
    """

    def __init__(self, *, mode: str = "verify", algorithms: Sequence[str] = DEFAULT_DPOP_ALGORITHMS,
                 max_age: float = 60.0, leeway: float = 10.0, clock: Callable[[], float] = time.time) -> None:
        if mode not in ("verify", "upstream"):
            raise ConfigurationError('sender_constraint must be "verify" or "upstream"')
        self.mode = mode
        self.dpop = DPoPVerifier(algorithms=algorithms, max_age=max_age, leeway=leeway, clock=clock)
        self.algs = " ".join(self.dpop.algorithms)

    def check(self, request: RequestInfo, scheme: str, token: str, claims: Mapping[str, Any]) -> Binding | Denial:
        """The keys ``request`` proved, or the denial; ``scheme`` is the Authorization scheme, lower-case."""
        cnf = claims.get("cnf")
        if cnf is None and scheme == "bearer" and not request.client_cert and "dpop" not in request.headers:
            return UNBOUND  # a bearer token bound to nothing, presented without a proof or a certificate
        if cnf is not None and not isinstance(cnf, Mapping):
            return Denial("invalid_token", "claim cnf must be an object")
        bound_jkt = _cnf_member(cnf, "jkt")
        bound_x5t = _cnf_member(cnf, "x5t#S256")
        if isinstance(bound_jkt, Denial):
            return bound_jkt
        if isinstance(bound_x5t, Denial):
            return bound_x5t
        if self.mode == "upstream":
            return Binding()
        if bound_jkt is not None and scheme != "dpop":
            return self.challenge(Denial("invalid_token", "this token is DPoP-bound: present it with the DPoP "
                                                          "authorization scheme and a DPoP proof"))
        if bound_jkt is None and scheme == "dpop":
            return self.challenge(Denial("invalid_token", "this token is not DPoP-bound: present it with the "
                                                          "Bearer authorization scheme"))
        jkt = None
        header = request.headers.get("dpop")
        if header is not None:
            try:
                jkt = self.dpop.verify(header, request, token).jkt
            except InvalidDPoPProof as exc:
                return self.challenge(Denial("invalid_token", f"invalid DPoP proof: {exc}"), "invalid_dpop_proof")
        elif bound_jkt is not None:
            return self.challenge(Denial("invalid_token", "a DPoP-bound token needs a DPoP proof"),
                                  "invalid_dpop_proof")
        if bound_jkt is not None and not hmac.compare_digest(str(jkt).encode(), bound_jkt.encode()):
            return self.challenge(Denial("token_reuse", "this token is bound to another key than the DPoP proof's: "
                                                        "it is used by a client that does not hold its key"))
        x5t = _client_certificate(request)
        if bound_x5t is not None:
            if x5t is None:
                return Denial("invalid_token", "this token is bound to a TLS client certificate (RFC 8705) and "
                                               "none was presented")
            if not hmac.compare_digest(x5t.encode(), bound_x5t.encode()):
                return Denial("token_reuse", "this token is bound to another client certificate: it is used by "
                                             "a client that does not hold its key")
        return Binding(jkt, x5t)

    def challenge(self, denial: Denial, error: str | None = None) -> Denial:
        """``denial`` answered with a ``DPoP`` challenge (``algs``; ``error`` replaces the default error)."""
        extra: dict[str, object] = {**denial.extra, "auth_scheme": "DPoP", "dpop_algs": self.algs}
        if error is not None:
            extra["auth_error"] = error
        return replace(denial, extra=extra)


def _cnf_member(cnf: Mapping[str, Any] | None, name: str) -> str | Denial | None:
    value = None if cnf is None else cnf.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > _MAX_ID or not value.isascii():
        return Denial("invalid_token", f"claim cnf.{name} must be a non-empty string of at most {_MAX_ID} "
                                       "characters")
    return value


def _client_certificate(request: RequestInfo) -> str | None:
    if not request.client_cert:
        return None
    try:
        return certificate_thumbprint(request.client_cert)
    except (ValueError, binascii.Error):  # not a PEM certificate: as if none was presented
        return None
