"""The exception tree of sa-middleware.

::

    SAMiddlewareError
     +-- ConfigurationError      bad Guard / Policy / store options, raised at start-up
     |    +-- IssuerRequired     an operation names a subject whose issuer cannot be told: pass issuer=
     +-- StoreError              the store failed
     |    +-- StoreUnavailable   the store did not answer in time (requests get 503 store_unavailable)
     +-- InvalidToken            a bearer token failed verification (requests get 401 invalid_token)
     |    +-- KeysUnavailable    the signing keys could not be fetched (requests get 503 keys_unavailable)
     +-- InvalidRequest          a request the Guard cannot decide safely (requests get 400 invalid_request)

Requests never see these exceptions: the middleware turns them into denials.
"""

from __future__ import annotations

__all__ = [
    "ConfigurationError", "InvalidRequest", "InvalidToken", "IssuerRequired", "KeysUnavailable", "SAMiddlewareError",
    "StoreError", "StoreUnavailable",
]


class SAMiddlewareError(Exception):
    """Base class of every error raised by sa-middleware."""


class ConfigurationError(SAMiddlewareError, ValueError):
    """An option is invalid; raised when the Guard, a Policy or a store is built."""


class IssuerRequired(ConfigurationError):
    """An operation names a subject known under several issuers (or, for a change, under none of the candidates):
    nothing was changed; name the issuer (``issuer=``, ``--issuer``)."""


class StoreError(SAMiddlewareError):
    """The store failed to carry out an operation."""


class StoreUnavailable(StoreError):
    """The store did not answer within its timeout."""


class InvalidToken(SAMiddlewareError):
    """A token failed verification. The message is safe to show: it never contains the token."""


class KeysUnavailable(InvalidToken):
    """The issuer's signing keys (its JWK set) could not be fetched, so a token could not be checked at all.

    A subclass of :class:`InvalidToken` so that code catching that one still refuses the token; the middleware
    answers it with 503 ``keys_unavailable`` and ``Retry-After`` instead of 401, because the token may be good.
    """

    def __init__(self, message: str = "signing keys unavailable", retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class InvalidRequest(SAMiddlewareError):
    """A request whose URL or headers cannot be decided safely (a lock key with a dot segment or over the length
    cap, a method-override header). The message is safe to show."""
