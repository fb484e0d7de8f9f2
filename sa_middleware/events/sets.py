"""Security Event Token validation (RFC 8417 as profiled by SSF 1.0): a compact JWS in, a :class:`SecurityEvent` out.

The signature is checked by :class:`~sa_middleware.tokens.TokenVerifier` (the same allow-listed algorithms, key
loading, JWKS fetching and header hygiene as access tokens) with the transmitter's keys only. Everything else is
checked here, before the signature, so each failure gets its registered error code:

=====================  ===========================================================================================
``invalid_request``    not a compact JWS (an encrypted SET is refused too), header ``typ`` not ``secevent+jwt``,
                       payload not a JSON object, a ``sub`` or ``exp`` claim (SSF 1.0 forbids them), ``iat``
                       missing, in the future or older than ``max_age``, ``jti`` missing, ``events`` not exactly
                       one event, a subject missing, malformed or of an unsupported format
``invalid_issuer``     ``iss`` is not the transmitter's issuer (compared exactly)
``invalid_audience``   ``aud`` does not contain the receiver's audience
``invalid_key``        the signature does not verify with the transmitter's keys, or the algorithm or key id is
                       not acceptable
=====================  ===========================================================================================

Descriptions never echo the SET or a value taken from it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigurationError, InvalidToken, KeysUnavailable
from ..operations import finite_number
from ..tokens import TokenVerifier, VerifiedToken
from .errors import SETError
from .subjects import Subject, parse_subject

__all__ = ["ASYMMETRIC_ALGORITHMS", "SETValidator", "SecurityEvent"]

#: the default allow-list: every asymmetric JWS algorithm (each key is only used with its own family)
ASYMMETRIC_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
_SEGMENT = re.compile(r"[A-Za-z0-9_-]*")
_SET_TYPE = "secevent+jwt"


@dataclass(frozen=True, slots=True)
class SecurityEvent:
    """One validated SET carrying one event."""

    jti: str
    issuer: str
    issued_at: float
    event_type: str
    payload: Mapping[str, Any]
    """The event object (the value of the one member of ``events``)."""
    subject: Subject
    txn: str | None = None

    @property
    def key(self) -> str:
        """The replay key: a digest of the issuer and the ``jti`` (a ``jti`` is unique per issuer)."""
        return "set:" + hashlib.sha256(json.dumps([self.issuer, self.jti]).encode()).hexdigest()

    @property
    def event_timestamp(self) -> float | None:
        """The event's ``event_timestamp`` (CAEP), when given (validated as a finite number)."""
        value = self.payload.get("event_timestamp")
        return float(value) if value is not None else None

    @property
    def short_type(self) -> str:
        """The last segment of the event type URI, e.g. ``session-revoked`` (for logs and output)."""
        return self.event_type.rstrip("/").rsplit("/", 1)[-1][:64]


def _b64json(segment: str) -> Any:
    try:
        return json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (binascii.Error, ValueError, RecursionError):
        raise SETError("invalid_request", "the body is not a JWT") from None


def _audiences(value: str | Sequence[str]) -> frozenset[str]:
    values = [value] if isinstance(value, str) else list(value)
    if not values or not all(isinstance(v, str) and v for v in values):
        raise ConfigurationError("audience must be a non-empty string or a list of them")
    return frozenset(values)


class SETValidator:
    """Validates SETs from one transmitter (``issuer``) for one receiver (``audience``).

    Give exactly one of ``keys``, ``jwks`` or ``jwks_url`` (as for the Guard). ``max_age`` bounds how old a SET may
    be (its ``iat``), which also bounds how long its ``jti`` must be remembered against replay.
    """

    def __init__(
        self,
        *,
        issuer: str,
        audience: str | Sequence[str],
        keys: Any = None,
        jwks: Mapping[str, Any] | None = None,
        jwks_url: str | None = None,
        algorithms: Sequence[str] = ASYMMETRIC_ALGORITHMS,
        leeway: float = 10.0,
        max_age: float = 7 * 86400.0,
        max_bytes: int = 65536,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(issuer, str) or not issuer:
            raise ConfigurationError("issuer must be the transmitter's issuer identifier")
        self.issuer = issuer
        self.audience = _audiences(audience)
        number = finite_number(max_age)
        if number is None or number <= 0:
            raise ConfigurationError("max_age must be a positive number of seconds")
        self.max_age = number
        self.leeway = float(leeway)
        self.max_bytes = max_bytes
        self._clock = clock
        self.verifier = TokenVerifier(
            keys=keys, jwks=jwks, jwks_url=jwks_url, algorithms=algorithms, issuer=issuer, audience=None,
            leeway=leeway, required_claims=("iat", "jti"), token_type=_SET_TYPE, max_token_bytes=max_bytes,
            cache_size=0, clock=clock, require_expiry=False)

    def validate(self, token: str | bytes) -> SecurityEvent:
        """Validate a SET, blocking (a JWKS fetch may happen); raise :class:`SETError`."""
        text = self._precheck(token)
        try:
            verified = self.verifier.verify(text)
        except KeysUnavailable:
            raise  # the transmitter's keys could not be fetched: not the SET's fault (503, delivered again)
        except InvalidToken as exc:
            raise SETError("invalid_key", f"the SET signature was not accepted: {exc}") from None
        return self._event(verified)

    async def avalidate(self, token: str | bytes) -> SecurityEvent:
        """Like :meth:`validate`, without blocking the event loop (a JWKS fetch runs in a worker thread)."""
        text = self._precheck(token)
        try:
            verified = await self.verifier.averify(text)
        except KeysUnavailable:
            raise  # the transmitter's keys could not be fetched: not the SET's fault (503, delivered again)
        except InvalidToken as exc:
            raise SETError("invalid_key", f"the SET signature was not accepted: {exc}") from None
        return self._event(verified)

    # -- before the signature --------------------------------------------------------------------------------

    def _precheck(self, token: str | bytes) -> str:
        if isinstance(token, bytes | bytearray):
            try:
                token = bytes(token).decode("ascii")
            except UnicodeDecodeError:
                raise SETError("invalid_request", "the body is not a JWT") from None
        if not isinstance(token, str):
            raise SETError("invalid_request", "the body is not a JWT")
        text = token.strip()
        if len(text) > self.max_bytes:
            raise SETError("invalid_request", "the SET is too large")
        segments = text.split(".")
        if len(segments) == 5:
            raise SETError("invalid_request", "encrypted SETs are not supported; send a signed SET")
        if len(segments) != 3 or not all(_SEGMENT.fullmatch(s) for s in segments) or not all(segments[:2]):
            raise SETError("invalid_request", "the body is not a compact JWS")
        header = _b64json(segments[0])
        if not isinstance(header, dict):
            raise SETError("invalid_request", "the JOSE header is not a JSON object")
        typ = header.get("typ")
        if not isinstance(typ, str) or typ.strip().lower().removeprefix("application/") != _SET_TYPE:
            raise SETError("invalid_request", "the JOSE header typ must be secevent+jwt")
        claims = _b64json(segments[1])
        if not isinstance(claims, dict):
            raise SETError("invalid_request", "the SET payload is not a JSON object")
        self._check_claims(claims)
        return text

    def _check_claims(self, claims: Mapping[str, Any]) -> None:
        iss = claims.get("iss")
        if not isinstance(iss, str) or not iss:
            raise SETError("invalid_request", "the SET has no iss claim")
        if iss != self.issuer:
            raise SETError("invalid_issuer", "the SET issuer is not this receiver's transmitter")
        aud = claims.get("aud")
        auds = [aud] if isinstance(aud, str) else aud
        if not isinstance(auds, list) or not auds or not all(isinstance(a, str) for a in auds):
            raise SETError("invalid_request", "the SET has no aud claim")
        if self.audience.isdisjoint(auds):
            raise SETError("invalid_audience", "the SET audience does not include this receiver")
        for name in ("sub", "exp"):
            if name in claims:
                raise SETError("invalid_request", f"a SET must not have a {name} claim (SSF 1.0)")
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti or len(jti) > 256:
            raise SETError("invalid_request", "the SET needs a jti claim of at most 256 characters")
        iat = finite_number(claims.get("iat"))
        if iat is None:
            raise SETError("invalid_request", "the SET needs a numeric iat claim")
        now = self._clock()
        if iat > now + self.leeway:
            raise SETError("invalid_request", "the SET was issued in the future")
        if iat < now - self.max_age:
            raise SETError("invalid_request", "the SET is older than this receiver accepts")
        if "nbf" in claims:
            nbf = finite_number(claims["nbf"])
            if nbf is None or nbf > now + self.leeway:
                raise SETError("invalid_request", "the SET is not yet valid")
        txn = claims.get("txn")
        if txn is not None and not isinstance(txn, str):
            raise SETError("invalid_request", "the txn claim must be a string")
        events = claims.get("events")
        if not isinstance(events, dict) or not events:
            raise SETError("invalid_request", "the SET needs an events claim with one event")
        if len(events) != 1:
            raise SETError("invalid_request", "a SET must carry exactly one event")
        ((event_type, payload),) = events.items()
        if not event_type or len(event_type) > 512 or not isinstance(payload, dict):
            raise SETError("invalid_request", "the event must be a JSON object under its event type URI")
        if "event_timestamp" in payload and (finite_number(payload["event_timestamp"]) is None
                                             or payload["event_timestamp"] < 0):
            raise SETError("invalid_request", "event_timestamp must be a number of seconds since the epoch")

    # -- after the signature ---------------------------------------------------------------------------------

    def _event(self, verified: VerifiedToken) -> SecurityEvent:
        claims = verified.claims
        self._check_claims(claims)  # the verified payload is the one pre-checked; cheap, and no assumption made
        ((event_type, payload),) = claims["events"].items()
        if "sub_id" in claims:
            subject = parse_subject(claims["sub_id"], "sub_id")
        elif "subject" in payload:  # CAEP / RISC events written before SSF 1.0 required sub_id
            subject = parse_subject(payload["subject"], "subject")
        else:
            raise SETError("invalid_request", "the SET has no sub_id claim")
        return SecurityEvent(jti=claims["jti"], issuer=claims["iss"], issued_at=float(claims["iat"]),
                             event_type=event_type, payload=payload, subject=subject, txn=claims.get("txn"))
