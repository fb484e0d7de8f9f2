"""What a verified token's claims mean to the Guard: the principal's kind, the token's scopes, its session key.

Identity providers shape their access tokens differently (see ``docs/identity-providers.md``); these functions
read the shapes of the major ones, and every choice is a :class:`~sa_middleware.Guard` option.

Kind rules (``Guard(kind_rules=...)``), tried in order after the kind claim (``sa_kind``), which always wins; the
first rule that answers decides, and a token no rule recognises is ``human``:

- ``"client_id"``: ``client_id``, ``azp`` or ``cid`` equals ``sub`` (a client-credentials token, RFC 9068
  section 2.2, Okta, most providers): ``service``.
- ``"auth0"``: ``gty`` is ``client-credentials``, or ``sub`` ends with ``@clients`` (Auth0 machine-to-machine).
- ``"entra"``: ``idtyp`` is ``app``, or ``roles`` without ``scp`` and ``oid == sub`` (Microsoft Entra ID
  app-only tokens, v1 and v2).
- ``"okta"``: ``cid == sub`` and no ``uid`` (Okta client credentials).
- ``"keycloak"``: ``preferred_username`` starts with ``service-account-`` (a Keycloak client's service account).

A rule may also be a callable ``rule(claims) -> "human" | "service" | "agent" | None`` (None: no opinion).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .errors import ConfigurationError

__all__ = [
    "DEFAULT_KIND_RULES", "DEFAULT_SCOPE_CLAIMS", "DEFAULT_SESSION_CLAIMS", "KINDS", "KindRule", "KindRules",
    "check_claim_names", "check_kind_rules", "check_session_claims", "encodable", "kind_of", "scopes_of", "session_key",
]

KindRule = Callable[[Mapping[str, Any]], str | None]
KindRules = tuple[KindRule, ...]

KINDS = frozenset({"human", "service", "agent"})
#: the built-in kind rules, in the order they are tried by default
DEFAULT_KIND_RULES: tuple[str, ...] = ("client_id", "auth0", "entra", "okta", "keycloak")
#: the claims whose scopes a token grants (their union): space-separated strings or arrays of strings
DEFAULT_SCOPE_CLAIMS: tuple[str, ...] = ("scope", "scp")
#: the claims tried in order for the session key; the token's hash when none is present
DEFAULT_SESSION_CLAIMS: tuple[str, ...] = ("sid", "jti")
_TOKEN_SESSION_CLAIMS = frozenset(DEFAULT_SESSION_CLAIMS)  # unique per login or per token: used as they are
_MAX_ID = 256


def _service_if(condition: bool) -> str | None:
    return "service" if condition else None


def _client_id(claims: Mapping[str, Any]) -> str | None:
    sub = claims.get("sub")
    return _service_if(isinstance(sub, str) and any(claims.get(name) == sub for name in ("client_id", "azp", "cid")))


def _auth0(claims: Mapping[str, Any]) -> str | None:
    sub = claims.get("sub")
    return _service_if(claims.get("gty") == "client-credentials"
                       or (isinstance(sub, str) and sub.endswith("@clients")))


def _entra(claims: Mapping[str, Any]) -> str | None:
    if claims.get("idtyp") == "app":
        return "service"
    sub = claims.get("sub")
    return _service_if(isinstance(sub, str) and "roles" in claims and "scp" not in claims and claims.get("oid") == sub)


def _okta(claims: Mapping[str, Any]) -> str | None:
    sub = claims.get("sub")
    return _service_if(isinstance(sub, str) and claims.get("cid") == sub and "uid" not in claims)


def _keycloak(claims: Mapping[str, Any]) -> str | None:
    name = claims.get("preferred_username")
    return _service_if(isinstance(name, str) and name.startswith("service-account-"))


_RULES: dict[str, KindRule] = {"client_id": _client_id, "auth0": _auth0, "entra": _entra, "okta": _okta,
                               "keycloak": _keycloak}


def check_kind_rules(rules: Sequence[str | KindRule]) -> KindRules:
    """The rules as callables; raise :class:`ConfigurationError` for an unknown name or a non-callable."""
    if isinstance(rules, str) or not isinstance(rules, Sequence):
        raise ConfigurationError(f"kind_rules must be a list of rule names ({', '.join(_RULES)}) or callables")
    result: list[KindRule] = []
    for rule in rules:
        if isinstance(rule, str):
            if rule not in _RULES:
                raise ConfigurationError(f"unknown kind rule {rule!r}; known: {', '.join(_RULES)}")
            result.append(_RULES[rule])
        elif callable(rule):
            result.append(rule)
        else:
            raise ConfigurationError("a kind rule is a rule name or a callable(claims) -> kind or None")
    return tuple(result)


def check_claim_names(option: str, names: str | Sequence[str]) -> tuple[str, ...]:
    """A claim name or a non-empty list of them, as a tuple."""
    values = (names,) if isinstance(names, str) else names
    if not isinstance(values, Sequence) or not values or not all(isinstance(n, str) and n for n in values):
        raise ConfigurationError(f"{option} must be a claim name or a non-empty list of claim names")
    return tuple(values)


def check_session_claims(option: str | Sequence[str] | Mapping[str, str | Sequence[str]]) -> dict[str, tuple[str, ...]]:
    """The session claims of each kind: one list for every kind, or ``{kind: claims}`` (kinds left out keep the
    default ``sid``, ``jti``)."""
    if isinstance(option, Mapping):
        unknown = set(option) - KINDS
        if unknown:
            raise ConfigurationError(f"session_claim keys must be kinds (human, service, agent), not {sorted(unknown)}")
        return {kind: check_claim_names(f"session_claim[{kind!r}]", option[kind]) if kind in option
                else DEFAULT_SESSION_CLAIMS for kind in KINDS}
    names = check_claim_names("session_claim", option)
    return dict.fromkeys(KINDS, names)


def kind_of(claims: Mapping[str, Any], kind_claim: str, rules: KindRules) -> str:
    """The principal's kind: the kind claim when present, else the first rule's answer, else ``human``.
    Raises ValueError when the kind claim or a rule gives something else than a kind."""
    kind = claims.get(kind_claim)
    if kind is None:
        for rule in rules:
            kind = rule(claims)
            if kind is not None:
                break
        else:
            return "human"
    if not isinstance(kind, str) or kind not in KINDS:
        raise ValueError(kind)
    return kind


def scopes_of(claims: Mapping[str, Any], names: Sequence[str]) -> frozenset[str]:
    """The union of the scopes in the claims ``names``: space-separated strings or arrays of strings (other
    values grant nothing)."""
    scopes: set[str] = set()
    for name in names:
        value = claims.get(name)
        if isinstance(value, str):
            scopes.update(value.split())
        elif isinstance(value, list) and all(isinstance(s, str) for s in value):
            scopes.update(value)
    return frozenset(scopes)


def session_key(claims: Mapping[str, Any], names: Sequence[str], sub: str, fingerprint: str) -> str:
    """The session id: the first claim of ``names`` present. ``sid`` and ``jti`` are used as they are; any other
    claim (``client_id``, ``azp``...) names a session per principal and value, ``<sub>/<claim>:<value>`` (hashed
    when longer than 256 characters). Without any of them, a hash of the token."""
    for name in names:
        value = claims.get(name)
        if value is None:
            continue
        if not isinstance(value, str) or not value or len(value) > _MAX_ID or not encodable(value):
            raise ValueError(name)
        if name in _TOKEN_SESSION_CLAIMS:
            return value
        key = f"{sub}/{name}:{value}"
        return key if len(key) <= _MAX_ID else "h:" + hashlib.sha256(key.encode()).hexdigest()
    return fingerprint[:32]


def encodable(value: str) -> bool:
    """Whether ``value`` can be stored (no lone surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates
        return False
    return True
