"""The exception tree of sa-middleware.

::

    SAMiddlewareError
     +-- ConfigurationError      bad Guard / Policy / store options, raised at start-up
     +-- StoreError              the store failed
     |    +-- StoreUnavailable   the store did not answer in time (requests get 503 store_unavailable)
     +-- InvalidToken            a bearer token failed verification (requests get 401 invalid_token)
     +-- InvalidRequest          a request the Guard cannot decide safely (requests get 400 invalid_request)

Requests never see these exceptions: the middleware turns them into denials.
"""

from __future__ import annotations

__all__ = ["ConfigurationError", "InvalidRequest", "InvalidToken", "SAMiddlewareError", "StoreError",
           "StoreUnavailable"]


class SAMiddlewareError(Exception):
    """Base class of every error raised by sa-middleware."""


class ConfigurationError(SAMiddlewareError, ValueError):
    """An option is invalid; raised when the Guard, a Policy or a store is built."""


class StoreError(SAMiddlewareError):
    """The store failed to carry out an operation."""


class StoreUnavailable(StoreError):
    """The store did not answer within its timeout."""


class InvalidToken(SAMiddlewareError):
    """A token failed verification. The message is safe to show: it never contains the token."""


class InvalidRequest(SAMiddlewareError):
    """A request whose URL or headers cannot be decided safely (a lock key with a dot segment or over the length
    cap, a method-override header). The message is safe to show."""
