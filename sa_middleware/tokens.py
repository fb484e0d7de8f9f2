"""Bearer-token verification: step 1 of every decision.

:class:`TokenVerifier` checks a compact JWS/JWT with PyJWT and ``cryptography`` and returns a
:class:`VerifiedToken`, or raises :class:`~sa_middleware.errors.InvalidToken` with a short, safe detail
(never the token, never a key).

Defaults and rules:

- ``algorithms`` is an explicit, required allow-list. ``none`` (any case) is refused, and so is mixing HMAC
  (``HS*``) with asymmetric algorithms in one verifier (algorithm-confusion attacks). Each key is only ever
  used with the algorithms of its own family (RSA: ``RS*``/``PS*``; EC: the ``ES*`` of its curve;
  Ed25519/Ed448: ``EdDSA``; secrets: ``HS*``).
- HMAC secrets must be at least as long as the hash output (32 bytes for HS256, 48 for HS384, 64 for
  HS512, RFC 7518 section 3.2) and must not look like a PEM / SSH / DER public key. RSA keys must be at
  least 2048 bits.
- ``leeway`` is **10 seconds**, applied to ``exp``, ``nbf`` and ``iat`` (an ``iat`` more than ``leeway``
  in the future is refused).
- Tokens longer than ``max_token_bytes`` (**8192**) are refused before anything is decoded; so is anything
  that is not three non-empty, unpadded base64url segments.
- Required claims default to **exp, iat, sub**. ``exp`` is always required, whatever ``required_claims``
  says: a verified token always has an expiry, which bounds the cache and the session. The one exception is a
  verifier built with ``require_expiry=False`` (for Security Event Tokens, which must not carry ``exp``, RFC 8417
  and SSF 1.0): a token without ``exp`` then verifies with ``expires_at`` infinite, and such a verifier keeps no
  cache. ``exp``, ``nbf``
  and ``iat`` must be JSON numbers (not booleans, not strings); ``sub``, when present, a non-empty string.
- When ``audience`` is None the ``aud`` claim is not checked (a token that carries one is accepted); when
  ``issuer`` is None ``iss`` is not checked.
- Headers ``jku``, ``x5u``, ``jwk`` and ``x5c`` are refused: keys are never fetched from, or trusted
  because of, anything inside the token. ``crit`` is refused (no extension is understood). ``kid`` must
  be 1..128 characters of ``[A-Za-z0-9._:-]``. With ``token_type`` set, ``typ`` must match it
  case-insensitively, with or without the ``application/`` prefix (RFC 9068: ``at+jwt``).
- Verified tokens are kept in a bounded LRU cache (``cache_size``, default **4096** entries, 0 disables
  it), keyed by the token string. A hit costs one dict lookup under a lock plus one clock read: no
  decoding, no signature check. An entry is dropped the moment the clock reaches its ``exp`` (the leeway
  does not extend a cache entry). Failures are never cached. When a key leaves the JWK set (a refresh no
  longer lists it, or :meth:`TokenVerifier.drop_key`), the cached tokens it verified are forgotten at once.
- ``jwks_url``: the JWK set is fetched with :class:`jwt.PyJWKClient` (http(s) only, no redirects, a 5 s
  timeout), one fetch at a time (concurrent verifications wait for it and share its result), and kept for
  ``jwks_ttl`` seconds (default **300**). A token with an unknown ``kid`` triggers a refresh, at most once per
  ``jwks_refresh_interval`` seconds (default **5**) by ``clock``, so a flood of forged ``kid``s costs one fetch
  per interval. A failed fetch is retried after **1 s** at the earliest. When a refresh fails the previous key
  set stays usable for one more ``jwks_ttl``; with no usable set, verification fails closed with
  :class:`~sa_middleware.errors.KeysUnavailable` (the middleware's 503 ``keys_unavailable``).
- ``clock`` (default :func:`time.time`) drives every time check and the cache. With the default clock
  PyJWT's own ``exp`` check also runs (same time source, defence in depth); ``nbf`` and ``iat`` are checked by
  this module only, so a token from the future gets a detail naming the clock skew.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import math
import re
import threading
import time
import types
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio.to_thread
import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.exceptions import InvalidJTIError, InvalidSubjectError
from jwt.types import Options

from .errors import ConfigurationError, InvalidToken, KeysUnavailable

__all__ = ["TokenVerifier", "VerifiedToken", "generate_rsa_key", "mint_token"]

_log = logging.getLogger(__name__)

_HMAC_MIN_BYTES: dict[str, int] = {"HS256": 32, "HS384": 48, "HS512": 64}
_EC_CURVES: dict[str, str] = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}
_FAMILY: dict[str, str] = {
    **dict.fromkeys(_HMAC_MIN_BYTES, "oct"),
    **dict.fromkeys(("RS256", "RS384", "RS512", "PS256", "PS384", "PS512"), "RSA"),
    **dict.fromkeys(_EC_CURVES, "EC"),
    "EdDSA": "OKP",
}
_MIN_RSA_BITS = 2048
_FORBIDDEN_HEADERS = ("jku", "x5u", "jwk", "x5c", "crit")
_TOKEN_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
_KID_SHAPE = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_SSH_PREFIXES = (b"ssh-", b"ecdsa-sha2-", b"sk-ssh-", b"sk-ecdsa-")
_JWKS_TIMEOUT = 5.0
_JWKS_RETRY = 1.0  # seconds between a failed fetch and the next attempt
_NUMERIC_CLAIMS = ("exp", "nbf", "iat")


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    """A token whose signature, header and claims passed every check."""

    claims: Mapping[str, Any]
    """The decoded payload (a read-only view)."""
    header: Mapping[str, Any]
    """The decoded JOSE header (a read-only view)."""
    fingerprint: str
    """SHA-256 hex digest of the raw token string: a stable, non-secret handle for this exact token."""
    expires_at: float
    """The ``exp`` claim, as a float (seconds since the epoch); infinite for a token without ``exp`` accepted by a
    verifier built with ``require_expiry=False``."""
    memo: dict[object, Any] = field(default_factory=dict, compare=False, repr=False)
    """What a user of the verifier derived from these claims, kept with the token while it stays cached (keyed by
    that user, e.g. the Guard), so it is computed once per token rather than once per request."""


@dataclass(frozen=True, slots=True)
class _Key:
    """One verification key and the allow-listed algorithms it may be used with."""

    kid: str | None
    key: Any
    algorithms: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _KeySet:
    """An immutable set of keys, swapped atomically when a JWK set is refreshed."""

    keys: tuple[_Key, ...]
    by_kid: Mapping[str, tuple[_Key, ...]]
    unnamed: tuple[_Key, ...]
    fetched_at: float

    @classmethod
    def build(cls, keys: Iterable[_Key], fetched_at: float = 0.0) -> _KeySet:
        all_keys = tuple(keys)
        by_kid: dict[str, list[_Key]] = {}
        for k in all_keys:
            if k.kid is not None:
                by_kid.setdefault(k.kid, []).append(k)
        return cls(
            keys=all_keys,
            by_kid={kid: tuple(v) for kid, v in by_kid.items()},
            unnamed=tuple(k for k in all_keys if k.kid is None),
            fetched_at=fetched_at,
        )


class TokenVerifier:
    """Verifies bearer JWTs against an explicit algorithm allow-list and configured keys.

    Give exactly one of ``keys`` (a PEM string/bytes, a certificate, a ``cryptography`` key object, an HMAC
    secret for ``HS*``, a list of those, or a ``{kid: key}`` mapping), ``jwks`` (a JWK set dict) or
    ``jwks_url``. Every bad option raises :class:`~sa_middleware.errors.ConfigurationError` here, at
    construction. See the module docstring for the defaults and the rules applied to each token.
    """

    def __init__(
        self,
        *,
        keys: Any = None,
        jwks: Mapping[str, Any] | None = None,
        jwks_url: str | None = None,
        algorithms: Sequence[str],
        issuer: str | Sequence[str] | None = None,
        audience: str | Sequence[str] | None = None,
        leeway: float = 10.0,
        required_claims: Sequence[str] = ("exp", "iat", "sub"),
        token_type: str | Sequence[str] | None = None,
        max_token_bytes: int = 8192,
        cache_size: int = 4096,
        jwks_refresh_interval: float = 5.0,
        jwks_ttl: float = 300.0,
        clock: Callable[[], float] = time.time,
        require_expiry: bool = True,
    ) -> None:
        self._algorithms = _check_algorithms(algorithms)
        self._issuer = _check_str_or_strs("issuer", issuer)
        self._audience = _check_str_or_strs("audience", audience)
        self._leeway = _check_number("leeway", leeway, allow_zero=True)
        self._require_expiry = bool(require_expiry)
        self._required = _check_required(required_claims, self._require_expiry)
        self._token_types = _check_token_types(token_type)
        self._max_token_bytes = _check_int("max_token_bytes", max_token_bytes, minimum=16)
        self._cache_size = _check_int("cache_size", cache_size, minimum=0) if self._require_expiry else 0
        self._refresh_interval = _check_number("jwks_refresh_interval", jwks_refresh_interval, allow_zero=False)
        self._jwks_ttl = _check_number("jwks_ttl", jwks_ttl, allow_zero=False)
        if self._jwks_ttl < self._refresh_interval:
            raise ConfigurationError("jwks_ttl must be at least jwks_refresh_interval")
        if not callable(clock):
            raise ConfigurationError("clock must be a callable returning seconds since the epoch")
        self._clock = clock

        if sum(value is not None for value in (keys, jwks, jwks_url)) != 1:
            raise ConfigurationError("give exactly one of keys, jwks or jwks_url")

        self._static: _KeySet | None = None
        self._jwks_client: jwt.PyJWKClient | None = None
        self._jwks_state: _KeySet | None = None
        self._jwks_lock = threading.Lock()
        self._jwks_last_attempt: float | None = None
        self._jwks_failed = False  # the last fetch failed (the next may come after _JWKS_RETRY)
        self._jwks_stale = False  # refresh_keys was asked for: the next verification fetches
        self._jwks_fetching = False  # a fetch is running (a verification that needs keys waits for it)
        self._dropped: frozenset[str] = frozenset()
        if keys is not None:
            self._static = _KeySet.build(_keys_from_option(keys, self._algorithms))
        elif jwks is not None:
            self._static = _KeySet.build(_keys_from_jwks_option(jwks, self._algorithms))
        else:
            self._jwks_client = _make_jwks_client(jwks_url)

        self._cache: OrderedDict[str, tuple[VerifiedToken, str | None]] = OrderedDict()  # token -> (it, key kid)
        self._cache_lock = threading.Lock()

        self._options: Options = {
            "require": list(self._required),
            "verify_signature": True,
            "verify_exp": clock is time.time,
            "verify_nbf": False,  # _check_claims: its detail names the clock skew
            "verify_iat": False,
            "verify_aud": self._audience is not None,
            "verify_iss": self._issuer is not None,
            "verify_sub": True,
            "verify_jti": True,
            "enforce_minimum_key_length": True,
        }

    # ------------------------------------------------------------------ public

    @property
    def issuer(self) -> str | tuple[str, ...] | None:
        """The accepted ``iss`` value(s), or None when ``iss`` is not checked."""
        return self._issuer

    def verify(self, token: str, *, fetch: bool = True) -> VerifiedToken:
        """Verify ``token`` and return its claims; raise :class:`InvalidToken` for any failure
        (:class:`~sa_middleware.errors.KeysUnavailable` when the JWK set could not be fetched). With
        ``fetch=False`` the JWK set is never fetched (no I/O): only the keys at hand are used."""
        try:
            text = self._as_text(token)
            hit = self._cache_get(text)
            if hit is not None:
                return hit
            return self._verify_uncached(text, fetch)
        except InvalidToken:
            raise
        except Exception as exc:  # a bug or an unexpected library error must still deny, quietly
            _log.debug("token rejected by an unexpected %s", type(exc).__name__)
            raise InvalidToken("malformed token") from None

    async def averify(self, token: str) -> VerifiedToken:
        """Like :meth:`verify`; runs in a worker thread when a JWK set fetch may be needed."""
        try:
            text = self._as_text(token)
            hit = self._cache_get(text)
        except InvalidToken:
            raise
        except Exception:
            raise InvalidToken("malformed token") from None
        if hit is not None:
            return hit
        if self._jwks_client is not None and self._may_fetch(text):
            return await anyio.to_thread.run_sync(self.verify, text)
        return self.verify(text, fetch=False)

    def refresh_keys(self) -> int:
        """Fetch the JWK set now (one fetch, shared with concurrent verifications); returns the number of usable
        keys. Cached tokens of keys that left the set are forgotten. Raises
        :class:`~sa_middleware.errors.KeysUnavailable` when the fetch fails. No-op for static keys."""
        if self._jwks_client is None:
            return len(self._static.keys) if self._static is not None else 0
        with self._jwks_lock:
            if not self._fetch_locked(self._clock()):
                raise KeysUnavailable(retry_after=math.ceil(_JWKS_RETRY))
            state = self._jwks_state
            return len(state.keys) if state is not None else 0

    async def arefresh_keys(self) -> int:
        """Async twin of :meth:`refresh_keys` (the fetch runs in a worker thread)."""
        return await anyio.to_thread.run_sync(self.refresh_keys)

    def expire_keys(self) -> None:
        """Make the next verification fetch the JWK set (without waiting for ``jwks_ttl``)."""
        self._jwks_stale = True

    def drop_key(self, kid: str) -> int:
        """Stop trusting the key ``kid`` at once, even while the issuer still publishes it, for the life of
        this verifier; returns how many cached tokens it had verified (they are forgotten)."""
        if not isinstance(kid, str) or not _KID_SHAPE.fullmatch(kid):
            raise ConfigurationError("a key id is 1..128 characters of [A-Za-z0-9._:-]")
        with self._cache_lock:
            self._dropped = self._dropped | {kid}
            gone = [token for token, (_, used) in self._cache.items() if used == kid]
            for token in gone:
                del self._cache[token]
        return len(gone)

    @property
    def dropped_keys(self) -> frozenset[str]:
        """The key ids dropped with :meth:`drop_key`."""
        return self._dropped

    # ------------------------------------------------------------------ cache

    def _cache_get(self, token: str) -> VerifiedToken | None:
        if not self._cache_size:
            return None
        with self._cache_lock:
            entry = self._cache.get(token)
            if entry is None:
                return None
            if entry[0].expires_at <= self._clock():
                del self._cache[token]
                return None
            self._cache.move_to_end(token)
            return entry[0]

    def _cache_put(self, token: str, verified: VerifiedToken, kid: str | None) -> None:
        if not self._cache_size or verified.expires_at <= self._clock():
            return
        with self._cache_lock:
            if kid is not None and kid in self._dropped:
                return
            self._cache[token] = (verified, kid)
            self._cache.move_to_end(token)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    def _cache_forget(self, keyset: _KeySet) -> None:
        """Forget the cached tokens verified by a key that ``keyset`` no longer holds."""
        with self._cache_lock:
            gone = [token for token, (_, kid) in self._cache.items() if kid is None or kid not in keyset.by_kid]
            for token in gone:
                del self._cache[token]

    # ------------------------------------------------------------------ steps

    def _as_text(self, token: object) -> str:
        if isinstance(token, bytes | bytearray):
            if len(token) > self._max_token_bytes:
                raise InvalidToken("token too large")
            try:
                return bytes(token).decode("ascii")
            except UnicodeDecodeError:
                raise InvalidToken("malformed token") from None
        if not isinstance(token, str):
            raise InvalidToken("malformed token")
        if len(token) > self._max_token_bytes:
            raise InvalidToken("token too large")
        return token

    def _check_header(self, token: str) -> dict[str, Any]:
        """Shape and header checks, before any key is touched."""
        if not _TOKEN_SHAPE.fullmatch(token):
            raise InvalidToken("malformed token")
        header = _decode_header(token.split(".", 1)[0])
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise InvalidToken("algorithm not allowed")
        for name in _FORBIDDEN_HEADERS:
            if name in header:
                raise InvalidToken(f"unsupported header: {name}")
        if "kid" in header:
            kid = header["kid"]
            if not isinstance(kid, str) or not _KID_SHAPE.fullmatch(kid):
                raise InvalidToken("invalid kid")
        if self._token_types is not None:
            typ = header.get("typ")
            if not isinstance(typ, str) or _normalise_typ(typ) not in self._token_types:
                raise InvalidToken("wrong token type")
        return header

    def _verify_uncached(self, token: str, fetch: bool = True) -> VerifiedToken:
        header = self._check_header(token)
        alg: str = header["alg"]
        kid: str | None = header.get("kid")
        if kid is not None and kid in self._dropped:
            raise InvalidToken("signing key withdrawn")
        candidates = [k for k in self._candidate_keys(kid, fetch) if alg in k.algorithms
                      and (k.kid is None or k.kid not in self._dropped)]
        if not candidates:
            raise InvalidToken("no matching key")

        claims: dict[str, Any] | None = None
        used: _Key | None = None
        for candidate in candidates:
            try:
                claims = jwt.decode(
                    token,
                    candidate.key,
                    algorithms=list(candidate.algorithms),
                    issuer=self._issuer,
                    audience=self._audience,
                    leeway=self._leeway,
                    options=self._options,
                )
                used = candidate
                break
            except (jwt.InvalidSignatureError, jwt.InvalidKeyError):
                continue
            except Exception as exc:
                raise InvalidToken(_reason(exc)) from None
        if claims is None:
            raise InvalidToken("signature verification failed")

        expires_at = self._check_claims(claims)
        verified = VerifiedToken(
            claims=types.MappingProxyType(claims),
            header=types.MappingProxyType(header),
            fingerprint=hashlib.sha256(token.encode("ascii")).hexdigest(),
            expires_at=expires_at,
        )
        self._cache_put(token, verified, used.kid if used is not None else None)
        return verified

    def _check_claims(self, claims: Mapping[str, Any]) -> float:
        """Our own time and type checks, on ``clock``; returns ``exp``."""
        for name in _NUMERIC_CLAIMS:
            if name in claims:
                value = claims[name]
                if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                    raise InvalidToken(f"invalid claim: {name}")
        if "exp" not in claims and self._require_expiry:
            raise InvalidToken("missing claim: exp")
        now = self._clock()
        exp = float(claims["exp"]) if "exp" in claims else math.inf
        if exp <= now - self._leeway:
            raise InvalidToken("token expired")
        for name in ("nbf", "iat"):
            if name in claims and claims[name] > now + self._leeway:
                raise InvalidToken(f"{'token not yet valid' if name == 'nbf' else 'issued in the future: not valid'} "
                                   f"for another {math.ceil(claims[name] - now - self._leeway)} s ({name}); the "
                                   f"issuer's clock may be ahead of this server's; leeway is {self._leeway:g} s "
                                   "(Guard(leeway=...))")
        if "sub" in claims:
            sub = claims["sub"]
            if not isinstance(sub, str) or not sub:
                raise InvalidToken("invalid claim: sub")
        return exp

    # ------------------------------------------------------------------ keys

    def _candidate_keys(self, kid: str | None, fetch: bool = True) -> tuple[_Key, ...]:
        if self._static is not None:
            return _pick(self._static, kid)
        keyset = self._jwks_state
        if keyset is None or self._jwks_stale or self._clock() - keyset.fetched_at >= self._jwks_ttl:
            keyset = self._refresh_jwks(keyset, fetch)
        if kid is not None and kid not in keyset.by_kid:
            keyset = self._refresh_jwks(keyset, fetch)
        return _pick(keyset, kid)

    def _fetch_allowed(self, now: float) -> bool:
        last = self._jwks_last_attempt
        if last is None or self._jwks_stale:
            return True
        return now - last >= (_JWKS_RETRY if self._jwks_failed else self._refresh_interval)

    def _refresh_jwks(self, seen: _KeySet | None, fetch: bool = True) -> _KeySet:
        """Fetch the JWK set when a fetch is allowed now (see :meth:`_fetch_allowed`) and ``fetch`` is true;
        otherwise, or when the fetch fails, keep a set that is not too old."""
        if fetch:
            with self._jwks_lock:
                current = self._jwks_state
                if current is not seen and current is not None:
                    return current  # another thread refreshed while we waited for the lock
                if self._fetch_allowed(self._clock()) and self._fetch_locked(self._clock()):
                    assert self._jwks_state is not None
                    return self._jwks_state
        return self._usable(self._jwks_state)

    def _fetch_locked(self, now: float) -> bool:
        """Fetch the JWK set (the caller holds ``_jwks_lock``); returns whether it succeeded."""
        client = self._jwks_client
        assert client is not None
        self._jwks_last_attempt = now
        self._jwks_stale = False
        self._jwks_fetching = True
        try:
            fetched = client.get_jwk_set(refresh=True)
            keys = list(_keys_from_pyjwks(fetched, self._algorithms))
            if not keys:
                raise ValueError("no usable signing keys")
        except Exception as exc:
            self._jwks_failed = True
            _log.warning("JWK set fetch failed: %s", type(exc).__name__)
            return False
        finally:
            self._jwks_fetching = False
        self._jwks_failed = False
        keyset = _KeySet.build(keys, fetched_at=now)
        previous, self._jwks_state = self._jwks_state, keyset
        if previous is not None:
            self._cache_forget(keyset)
        return True

    def _usable(self, keyset: _KeySet | None) -> _KeySet:
        """``keyset`` while it is at most one ``jwks_ttl`` past its lifetime; else fail closed."""
        now = self._clock()
        if keyset is not None and now - keyset.fetched_at < 2 * self._jwks_ttl:
            return keyset
        last = self._jwks_last_attempt
        wait = _JWKS_RETRY if last is None else max(_JWKS_RETRY - (now - last), 0.0)
        raise KeysUnavailable(retry_after=max(1, math.ceil(wait)))

    def _may_fetch(self, token: str) -> bool:
        """True when verifying ``token`` would fetch the JWK set now, or wait for a fetch that is running (so must
        run off the event loop)."""
        now = self._clock()
        if not (self._jwks_fetching or self._fetch_allowed(now)):
            return False
        keyset = self._jwks_state
        if keyset is None or self._jwks_stale or now - keyset.fetched_at >= self._jwks_ttl:
            return True
        try:
            kid = self._check_header(token).get("kid")
        except Exception:
            return False  # verify() will refuse it without any I/O
        return kid is not None and kid not in keyset.by_kid and kid not in self._dropped


# ---------------------------------------------------------------------- helpers


def mint_token(key: Any, algorithm: str, claims: Mapping[str, Any], headers: Mapping[str, Any] | None = None) -> str:
    """Sign ``claims`` into a compact JWT (a thin wrapper over :func:`jwt.encode`, for demos and tests)."""
    return jwt.encode(dict(claims), key, algorithm=algorithm, headers=dict(headers) if headers else None)


def generate_rsa_key() -> tuple[Any, str]:
    """Return a fresh 2048-bit RSA key: ``(private key object, public key PEM)``."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, pem.decode("ascii")


def _reason(exc: Exception) -> str:
    """Map a decoding exception to a short, safe detail."""
    if isinstance(exc, jwt.ExpiredSignatureError):
        return "token expired"
    if isinstance(exc, jwt.ImmatureSignatureError):
        return "issued in the future" if "iat" in str(exc) else "token not yet valid"
    if isinstance(exc, jwt.InvalidIssuerError):
        return "wrong issuer"
    if isinstance(exc, jwt.InvalidAudienceError):
        return "wrong audience"
    if isinstance(exc, jwt.MissingRequiredClaimError):
        claim = exc.claim if isinstance(exc.claim, str) and _KID_SHAPE.fullmatch(exc.claim) else "?"
        return f"missing claim: {claim}"
    if isinstance(exc, jwt.InvalidAlgorithmError):
        return "algorithm not allowed"
    if isinstance(exc, jwt.InvalidIssuedAtError):
        return "invalid claim: iat"
    if isinstance(exc, InvalidSubjectError):
        return "invalid claim: sub"
    if isinstance(exc, InvalidJTIError):
        return "invalid claim: jti"
    return "malformed token"


def _decode_header(segment: str) -> dict[str, Any]:
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        header = json.loads(raw)
    except (binascii.Error, ValueError, RecursionError):
        raise InvalidToken("malformed token") from None
    if not isinstance(header, dict):
        raise InvalidToken("malformed token")
    return header


def _normalise_typ(value: str) -> str:
    value = value.strip().lower()
    return value.removeprefix("application/")


def _pick(keyset: _KeySet, kid: str | None) -> tuple[_Key, ...]:
    if kid is None:
        return keyset.keys
    named = keyset.by_kid.get(kid)
    if named:
        return named
    if keyset.unnamed:
        return keyset.unnamed
    raise InvalidToken("unknown kid")


# ---------------------------------------------------------------------- option checks


def _check_algorithms(algorithms: Sequence[str]) -> tuple[str, ...]:
    if isinstance(algorithms, str) or not isinstance(algorithms, Sequence) or not algorithms:
        raise ConfigurationError("algorithms must be a non-empty list of JWS algorithm names")
    result: list[str] = []
    for alg in algorithms:
        if not isinstance(alg, str):
            raise ConfigurationError("algorithm names must be strings")
        if alg.lower() == "none":
            raise ConfigurationError("the 'none' algorithm is never allowed")
        if alg not in _FAMILY:
            raise ConfigurationError(f"unknown or unsupported algorithm {alg!r}; known: {sorted(_FAMILY)}")
        if alg not in result:
            result.append(alg)
    hmac_algs = [a for a in result if _FAMILY[a] == "oct"]
    if hmac_algs and len(hmac_algs) != len(result):
        raise ConfigurationError("do not mix HS* with asymmetric algorithms in one verifier (key confusion)")
    return tuple(result)


def _check_str_or_strs(name: str, value: str | Sequence[str] | None) -> str | tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        if not value:
            raise ConfigurationError(f"{name} must not be empty")
        return value
    if not isinstance(value, Sequence) or not value or not all(isinstance(v, str) and v for v in value):
        raise ConfigurationError(f"{name} must be a string or a non-empty list of non-empty strings")
    return tuple(value)


def _check_token_types(value: str | Sequence[str] | None) -> frozenset[str] | None:
    checked = _check_str_or_strs("token_type", value)
    if checked is None:
        return None
    values = (checked,) if isinstance(checked, str) else checked
    return frozenset(_normalise_typ(v) for v in values)


def _check_required(claims: Sequence[str], require_expiry: bool = True) -> tuple[str, ...]:
    if isinstance(claims, str) or not isinstance(claims, Sequence):
        raise ConfigurationError("required_claims must be a list of claim names")
    result = ["exp"] if require_expiry else []
    for claim in claims:
        if not isinstance(claim, str) or not claim:
            raise ConfigurationError("required_claims must contain non-empty strings")
        if claim not in result:
            result.append(claim)
    return tuple(result)


def _check_number(name: str, value: float, *, allow_zero: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigurationError(f"{name} must be a finite number")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigurationError(f"{name} must be {'>= 0' if allow_zero else '> 0'}")
    return float(value)


def _check_int(name: str, value: int, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(f"{name} must be an integer >= {minimum}")
    return value


# ---------------------------------------------------------------------- key loading


def _usable_algorithms(key: Any, allowed: Sequence[str]) -> tuple[str, ...]:
    """The allow-listed algorithms that this (public) key or secret may verify."""
    if isinstance(key, bytes):
        return tuple(a for a in allowed if _FAMILY[a] == "oct")
    if isinstance(key, rsa.RSAPublicKey):
        return tuple(a for a in allowed if _FAMILY[a] == "RSA")
    if isinstance(key, ec.EllipticCurvePublicKey):
        return tuple(a for a in allowed if _EC_CURVES.get(a) == key.curve.name)
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return tuple(a for a in allowed if a == "EdDSA")
    return ()


def _public(key: Any) -> Any:
    if isinstance(
        key,
        rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey,
    ):
        return key.public_key()
    return key


def _looks_asymmetric(data: bytes) -> bool:
    stripped = data.strip()
    return b"-----BEGIN" in stripped or stripped.startswith(_SSH_PREFIXES)


def _load_pem(data: bytes) -> Any:
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            return x509.load_pem_x509_certificate(data).public_key()
        if b"PRIVATE KEY-----" in data:
            return serialization.load_pem_private_key(data, password=None).public_key()
        if data.strip().startswith(_SSH_PREFIXES):
            return serialization.load_ssh_public_key(data)
        return serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(f"could not load the key: {type(exc).__name__}") from None


def _load_key(kid: str | None, value: Any, allowed: Sequence[str]) -> _Key:
    hmac = _FAMILY[allowed[0]] == "oct"
    if isinstance(value, jwt.PyJWK):
        keys = list(_keys_from_pyjwks([value], allowed))
        if not keys:
            raise ConfigurationError("a PyJWK key does not match the allowed algorithms")
        return _Key(kid if kid is not None else keys[0].kid, keys[0].key, keys[0].algorithms)
    if isinstance(value, str | bytes | bytearray):
        data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
        if hmac:
            return _Key(kid, _check_secret(data, allowed), tuple(allowed))
        if not _looks_asymmetric(data):
            raise ConfigurationError("asymmetric algs need a PEM public key or a certificate, not a secret")
        key = _load_pem(data)
    else:
        if hmac:
            raise ConfigurationError("HS* algorithms need a secret (str or bytes), not a key object")
        key = value
    key = _public(key)
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < _MIN_RSA_BITS:
        raise ConfigurationError(f"RSA keys must be at least {_MIN_RSA_BITS} bits")
    algs = _usable_algorithms(key, allowed)
    if not algs:
        raise ConfigurationError(f"a {type(key).__name__} cannot verify any of the allowed algorithms {list(allowed)}")
    return _Key(kid, key, algs)


def _check_secret(data: bytes, allowed: Sequence[str]) -> bytes:
    if _looks_asymmetric(data):
        raise ConfigurationError("an HS* secret must not be a PEM or SSH key (key confusion)")
    need = max(_HMAC_MIN_BYTES[a] for a in allowed)
    if len(data) < need:
        raise ConfigurationError(f"the HS* secret must be at least {need} bytes for {list(allowed)}")
    return data


def _keys_from_option(keys: Any, allowed: Sequence[str]) -> list[_Key]:
    if isinstance(keys, Mapping):
        if "kty" in keys or "keys" in keys:
            raise ConfigurationError("pass a JWK or JWK set with jwks=..., not keys=...")
        result = []
        for kid, value in keys.items():
            if not isinstance(kid, str) or not _KID_SHAPE.fullmatch(kid):
                raise ConfigurationError("key ids must be 1..128 characters of [A-Za-z0-9._:-]")
            result.append(_load_key(kid, value, allowed))
    elif isinstance(keys, list | tuple):
        result = [_load_key(None, value, allowed) for value in keys]
    else:
        result = [_load_key(None, keys, allowed)]
    if not result:
        raise ConfigurationError("keys must not be empty")
    return result


def _keys_from_jwks_option(jwks: Mapping[str, Any], allowed: Sequence[str]) -> list[_Key]:
    if not isinstance(jwks, Mapping) or not isinstance(jwks.get("keys"), list):
        raise ConfigurationError('jwks must be a JWK set: {"keys": [...]}')
    try:
        keyset = jwt.PyJWKSet.from_dict(dict(jwks))
    except jwt.PyJWTError as exc:
        raise ConfigurationError(f"invalid JWK set: {type(exc).__name__}") from None
    result = list(_keys_from_pyjwks(keyset, allowed))
    if not result:
        raise ConfigurationError("the JWK set has no signing key usable with the allowed algorithms")
    return result


def _keys_from_pyjwks(keyset: Iterable[jwt.PyJWK], allowed: Sequence[str]) -> Iterable[_Key]:
    """Usable keys of a JWK set: ``use`` absent or ``sig``, ``alg`` absent or allow-listed, family matched."""
    for jwk in keyset:
        data: Mapping[str, Any] = jwk._jwk_data  # the raw JWK (PyJWK only exposes kid/use/kty)
        if data.get("use", "sig") != "sig":
            continue
        explicit_alg = data.get("alg")
        if explicit_alg is not None and explicit_alg not in allowed:
            continue
        kid = jwk.key_id if isinstance(jwk.key_id, str) and _KID_SHAPE.fullmatch(jwk.key_id) else None
        if jwk.key_id is not None and kid is None:
            continue
        key = _public(jwk.key)
        if isinstance(key, bytes):
            if _FAMILY[allowed[0]] != "oct" or _looks_asymmetric(key):
                continue
            if len(key) < max(_HMAC_MIN_BYTES[a] for a in allowed):
                continue
        if isinstance(key, rsa.RSAPublicKey) and key.key_size < _MIN_RSA_BITS:
            continue
        algs = _usable_algorithms(key, allowed)
        if explicit_alg is not None:
            algs = tuple(a for a in algs if a == explicit_alg)
        if algs:
            yield _Key(kid, key, algs)


def _make_jwks_client(url: str | None) -> jwt.PyJWKClient:
    if not isinstance(url, str) or not url:
        raise ConfigurationError("jwks_url must be an http(s) URL")
    try:
        return jwt.PyJWKClient(url, cache_jwk_set=False, timeout=_JWKS_TIMEOUT)
    except jwt.PyJWKClientError as exc:
        raise ConfigurationError(f"invalid jwks_url: {exc}") from None
