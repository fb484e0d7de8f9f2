"""Security events in: the OpenID Shared Signals (SSF 1.0) receiver, CAEP/RISC event mapping and poll delivery.

- :class:`SSFReceiver`: push delivery (RFC 8935) as an ASGI app and a WSGI app (``.wsgi``); its ``process``
  method is the one way a SET is applied (push, poll and ``sa-middleware events ingest`` all use it).
- :func:`poll`: poll delivery (RFC 8936), with acknowledgements and ``setErrs``.
- :mod:`.sets` (validation), :mod:`.subjects` (subject formats), :mod:`.mapping` (event -> Guard operations),
  :mod:`.processor` (de-duplication and the sync / async drivers).
"""

from __future__ import annotations

from .errors import SET_ERROR_CODES, SETError
from .mapping import SUPPORTED_EVENTS, Action, MappingOptions
from .poll import PollError, PollStats, poll
from .processor import EventOutcome, Verification
from .receiver import SSFReceiver
from .sets import ASYMMETRIC_ALGORITHMS, SecurityEvent, SETValidator
from .subjects import Subject, SubjectId, Targets

__all__ = [
    "ASYMMETRIC_ALGORITHMS",
    "SET_ERROR_CODES",
    "SUPPORTED_EVENTS",
    "Action",
    "EventOutcome",
    "MappingOptions",
    "PollError",
    "PollStats",
    "SETError",
    "SETValidator",
    "SSFReceiver",
    "SecurityEvent",
    "Subject",
    "SubjectId",
    "Targets",
    "Verification",
    "poll",
]
