"""The refusal of a Security Event Token, with its registered error code (RFC 8935 section 2.4, SSF 1.0)."""

from __future__ import annotations

from typing import Final

from ..errors import SAMiddlewareError

__all__ = ["SET_ERROR_CODES", "SETError"]

#: the "Security Event Token Error Codes" registry (RFC 8935 section 7.1) and SSF 1.0's ``invalid_state``
SET_ERROR_CODES: Final = frozenset({
    "invalid_request", "invalid_key", "invalid_issuer", "invalid_audience", "authentication_failed",
    "access_denied", "invalid_state",
})


class SETError(SAMiddlewareError):
    """A SET was refused. ``err`` is a registered code and ``description`` a short text that is safe to send
    back and to log: it never contains the SET, a claim value taken from it, or a secret."""

    def __init__(self, err: str, description: str) -> None:
        if err not in SET_ERROR_CODES:
            raise ValueError(f"unregistered SET error code {err!r}")
        super().__init__(f"{err}: {description}")
        self.err = err
        self.description = description
