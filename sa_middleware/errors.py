"""The exception tree of sa-middleware.

::

    SAMiddlewareError
     +-- ConfigurationError      bad Guard / Policy / store options, raised at start-up
     |    +-- IssuerRequired     an operation names a subject whose issuer cannot be told: pass issuer=
     +-- StoreError              the store failed
     |    +-- StoreUnavailable   the store did not answer in time (requests get 503 store_unavailable)
     +-- InvalidToken            a bearer token failed verification (requests get 401 invalid_token)

Requests never see these exceptions: the middleware turns them into denials.
"""

from __future__ import annotations

__all__ = ["ConfigurationError", "InvalidToken", "IssuerRequired", "SAMiddlewareError", "StoreError",
           "StoreUnavailable"]


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
