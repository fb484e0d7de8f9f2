"""sa-middleware: session-aware authorisation for ASGI and WSGI apps.

A valid bearer token is not proof of authority: every request is decided against the state of all related active
contexts (generations, sessions, actions in flight, object locks, compromise, posture) at the moment it runs.
"""

from __future__ import annotations

from .context import RequestInfo, SAContext
from .denials import CODES, Denial
from .errors import (
    ConfigurationError,
    InvalidToken,
    KeysUnavailable,
    SAMiddlewareError,
    StoreError,
    StoreUnavailable,
)
from .guard import Admitted, Guard
from .operations import Operations
from .policy import Policy
from .records import AuditRecord

__all__ = [
    "CODES",
    "Admitted",
    "AuditRecord",
    "ConfigurationError",
    "Denial",
    "Guard",
    "InvalidToken",
    "KeysUnavailable",
    "Operations",
    "Policy",
    "RequestInfo",
    "SAContext",
    "SAMiddlewareError",
    "StoreError",
    "StoreUnavailable",
]

__version__ = "0.1.0"
