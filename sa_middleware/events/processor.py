"""One SET in, its Guard operations applied once: validate, resolve the subject, plan, de-duplicate, apply.

Push (:mod:`.receiver`), poll (:mod:`.poll`) and ``sa-middleware events ingest`` all go through
:meth:`EventProcessor.process` (blocking) or :meth:`EventProcessor.aprocess` (the event loop; every store call is
an ``a``-operation). The two drivers differ only in how they call the validator and the Guard.

Replay: each SET's ``(iss, jti)`` is recorded in the store (``seen_event``) before its operations run, for
``max_age`` plus the leeway; a SET seen before is answered as accepted and not applied again, by any process that
shares the store. When applying fails (the store is unavailable), the record is dropped again (``forget_event``)
so the transmitter's redelivery is applied.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import Literal

import anyio

from ..errors import IssuerRequired
from ..guard import Guard
from .errors import SETError
from .mapping import (
    STREAM_UPDATED,
    SUPPORTED_EVENTS,
    VERIFICATION,
    Action,
    MappingOptions,
    Plan,
    opaque_kind,
    plan,
)
from .sets import SecurityEvent, SETValidator
from .subjects import Subject, SubjectResolver, Targets

__all__ = ["EventOutcome", "EventProcessor", "SubjectResolverHook", "Verification", "log_refusal"]

log = logging.getLogger("sa_middleware.events")

Status = Literal["applied", "ignored", "duplicate", "verified"]
#: a custom subject mapping: ``(subject, event_type) -> Targets`` (cheap and non-blocking: it runs on the loop)
SubjectResolverHook = Callable[[Subject, str], Targets]


@dataclass(frozen=True, slots=True)
class EventOutcome:
    """An accepted SET: ``applied`` (its operations ran), ``ignored`` (nothing to do here, see ``note``),
    ``duplicate`` (seen before: not applied again) or ``verified`` (an SSF verification event)."""

    event: SecurityEvent
    status: Status
    actions: tuple[Action, ...] = ()
    note: str = ""

    def describe(self) -> str:
        what = "; ".join(a.describe() for a in self.actions) or self.note
        return f"{self.status} {self.event.short_type} jti={self.event.jti}" + (f": {what}" if what else "")


@dataclass(frozen=True, slots=True)
class Verification:
    """The last SSF verification event received: its ``state``, the stream id (its ``sub_id``), when."""

    state: str | None
    stream_id: str | None
    jti: str
    received_at: float


class EventProcessor:
    """Applies validated SETs to a Guard. Built by :class:`~sa_middleware.events.SSFReceiver`."""

    def __init__(self, guard: Guard, validator: SETValidator, resolver: SubjectResolver, options: MappingOptions,
                 *, subject_resolver: SubjectResolverHook | None = None, verification_state: str | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.guard = guard
        self.validator = validator
        self.resolver = resolver
        self.options = options
        self.subject_resolver = subject_resolver
        self.verification_state = verification_state
        self.replay_ttl = validator.max_age + 2 * validator.leeway
        self.last_verification: Verification | None = None
        self.stream_status: str | None = None
        self._clock = clock

    # -- the pure part ---------------------------------------------------------------------------------------

    def decide(self, event: SecurityEvent, jti: str | None = None) -> Plan:
        """The plan for a validated event; raise :class:`SETError` when it cannot be accepted."""
        if jti is not None and jti != event.jti:
            raise SETError("invalid_request", "the SET's jti does not match the jti it was delivered under")
        if self.subject_resolver is not None:
            targets = self.subject_resolver(event.subject, event.event_type)
        else:
            targets = self.resolver.resolve(event.subject, opaque_kind(event.event_type))
        result = plan(event, targets, self.options)
        if event.event_type == VERIFICATION:
            state = event.payload.get("state")
            if self.verification_state is not None and state != self.verification_state:
                raise SETError("invalid_state", "the verification event's state is not the one requested")
        return result

    def _outcome(self, event: SecurityEvent, result: Plan) -> EventOutcome:
        if event.event_type == VERIFICATION:
            state = event.payload.get("state")
            stream = event.subject.simple.value if event.subject.simple is not None else None
            self.last_verification = Verification(state if isinstance(state, str) else None, stream, event.jti,
                                                  self._clock())
            outcome = EventOutcome(event, "verified", note=result.note)
        else:
            if event.event_type == STREAM_UPDATED:
                self.stream_status = str(event.payload.get("status"))
            outcome = EventOutcome(event, "applied" if result.actions else "ignored", result.actions, result.note)
        log.info("sa-middleware: security event %s", outcome.describe())
        self._observe(outcome)
        return outcome

    def _duplicate(self, event: SecurityEvent) -> EventOutcome:
        outcome = EventOutcome(event, "duplicate", note="seen before; not applied again")
        log.info("sa-middleware: security event %s", outcome.describe())
        self._observe(outcome)
        return outcome

    def _observe(self, outcome: EventOutcome) -> None:
        observer = self.guard.observer
        if observer is not None:
            event = outcome.event
            observer.security_event(event.short_type if event.event_type in SUPPORTED_EVENTS else "other",
                                    outcome.status)

    # -- the drivers -----------------------------------------------------------------------------------------

    def process(self, token: str | bytes, jti: str | None = None) -> EventOutcome:
        """Validate and apply one SET, blocking. Raises :class:`SETError` (refused), or the store's error when
        it could not be applied (then it was not recorded as seen, and a redelivery is applied)."""
        event = self.validator.validate(token)
        result = self.decide(event, jti)
        store = self.guard.store
        if store.seen_event(event.key, self.replay_ttl):
            return self._duplicate(event)
        try:
            for action in result.actions:
                getattr(self.guard, action.op)(*action.args, **_issuer(action), source=_source(event))
        except BaseException as exc:
            with suppress(Exception):
                store.forget_event(event.key)
            _refuse_unnamed(exc)
            raise
        return self._outcome(event, result)

    async def aprocess(self, token: str | bytes, jti: str | None = None) -> EventOutcome:
        """Like :meth:`process`, without blocking the event loop."""
        event = await self.validator.avalidate(token)
        result = self.decide(event, jti)
        store = self.guard.store
        if await store.aseen_event(event.key, self.replay_ttl):
            return self._duplicate(event)
        try:
            for action in result.actions:
                await getattr(self.guard, "a" + action.op)(*action.args, **_issuer(action), source=_source(event))
        except BaseException as exc:
            with anyio.CancelScope(shield=True), suppress(Exception):
                await store.aforget_event(event.key)
            _refuse_unnamed(exc)
            raise
        return self._outcome(event, result)


def _refuse_unnamed(exc: BaseException) -> None:
    """A subject whose principal's issuer cannot be told (known under several token issuers, or under none) is
    refused with ``invalid_request`` (400): a retry would fail the same way, and nothing was applied."""
    if isinstance(exc, IssuerRequired):
        raise SETError("invalid_request", "the subject names a principal of several token issuers, or of none "
                                          "known here: name it with an iss_sub subject") from None


def _issuer(action: Action) -> dict[str, str]:
    return {} if action.issuer is None else {"issuer": action.issuer}


def _source(event: SecurityEvent) -> str:
    """The audit source of an event's operations: ``event:<short type>``, e.g. ``event:session-revoked``."""
    return f"event:{event.short_type}"


def log_refusal(error: SETError, where: str) -> None:
    """Log a refused SET: its code and safe description only."""
    log.warning("sa-middleware: SET refused (%s) %s: %s", where, error.err, error.description)
