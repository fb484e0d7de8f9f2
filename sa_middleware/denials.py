"""Denial codes (a contract), their HTTP status, and the Denial value."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from .frozen import fast_init

__all__ = ["CODES", "Denial"]

#: code -> (status, title). The codes and their statuses are part of the public contract.
CODES: Final[dict[str, tuple[int, str]]] = {
    "missing_token": (401, "Missing bearer token"),
    "invalid_token": (401, "Invalid token"),
    "stale_generation": (401, "Stale credential generation"),
    "token_revoked": (401, "Token revoked"),
    "session_revoked": (401, "Session revoked"),
    "credential_compromised": (401, "Credential compromised"),
    "token_replayed": (401, "Token replayed"),
    "token_reuse": (401, "Token reused from another client"),
    "step_up_required": (401, "Step-up authentication required"),
    "insufficient_scope": (403, "Insufficient scope"),
    "session_paused": (403, "Session paused"),
    "device_noncompliant": (403, "Device non-compliant"),
    "too_many_sessions": (403, "Too many sessions"),
    "risk_too_high": (403, "Risk too high"),
    "conflicting_action": (409, "Conflicting action in flight"),
    "object_locked": (423, "Object locked"),
    "too_many_in_flight": (429, "Too many requests in flight"),
    "store_unavailable": (503, "Authorisation store unavailable"),
    "keys_unavailable": (503, "Signing keys unavailable"),
    "invalid_request": (400, "Invalid request"),
}


@fast_init
@dataclass(frozen=True, slots=True)
class Denial:
    """A refused request: a stable ``code`` (see :data:`CODES`), a safe ``detail``, and hints for the response.

    ``retry_after`` is sent as ``Retry-After`` (seconds); ``scope``, ``max_age`` and ``acr_values`` feed the
    ``WWW-Authenticate`` challenge (RFC 6750, RFC 9470).
    """

    code: str
    detail: str = ""
    retry_after: int | None = None
    scope: tuple[str, ...] = ()
    max_age: int | None = None
    acr_values: tuple[str, ...] = ()
    extra: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.code not in CODES:
            raise ValueError(f"unknown denial code {self.code!r}")

    @property
    def status(self) -> int:
        return CODES[self.code][0]

    @property
    def title(self) -> str:
        return CODES[self.code][1]
