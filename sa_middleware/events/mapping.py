"""From a security event to Guard operations: a pure function of the event, its resolved subject and the options.

=================================  ===================================================================================
event (CAEP 1.0 / RISC 1.0)        Guard operation
=================================  ===================================================================================
CAEP ``session-revoked``           ``revoke_session(session)``; for a principal subject ``revoke_sessions(sub,
                                   before=event_timestamp)``: every session whose token was issued by then
CAEP ``credential-change``         ``change_type`` ``revoke`` / ``update`` / ``delete``: ``rotate(sub)`` (or
                                   ``revoke_principal(sub)`` with ``on_credential_change="revoke_principal"``);
                                   ``create``: nothing to refuse
CAEP ``token-claims-change``       a changed ``scope`` (or ``scp``) claim: ``set_privileges(sub, scopes)``; other
                                   claims are not enforced here
CAEP ``assurance-level-change``    ``set_assurance(sub, current_level, at=event_timestamp)`` (through
                                   ``assurance_levels`` when the IdP's levels are not our ``acr`` values)
CAEP ``device-compliance-change``  ``set_device_status(device, current_status == "compliant")``
CAEP ``risk-level-change``         ``HIGH`` of a ``USER``: ``raise_risk(sub, risk_amount, risk_window)`` (or
                                   ``report_compromise`` with ``on_high_risk="report_compromise"``, which also
                                   acts on a ``SESSION``); ``LOW`` and ``MEDIUM``, and other principals
                                   (``DEVICE``, ``TENANT``...): nothing (a raised risk lapses after its window)
RISC ``credential-compromise``     ``report_compromise(sub, session_id)``
RISC ``account-disabled``          ``disable_principal(sub)`` (also RISC ``account-purged``)
RISC ``account-enabled``           ``enable_principal(sub)``
RISC ``sessions-revoked``          as ``session-revoked`` for a principal (the deprecated RISC event)
=================================  ===================================================================================

An event whose subject names nothing here, and an event type not in this table, is accepted and ignored (logged):
SSF 1.0 requires receivers to tolerate events they do not act on. A payload that breaks its event's definition
(a required member missing or of the wrong type or value) is refused with ``invalid_request``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final, Literal

from .errors import SETError
from .sets import SecurityEvent
from .subjects import Targets

__all__ = [
    "ACCOUNT_DISABLED", "ACCOUNT_ENABLED", "ACCOUNT_PURGED", "ASSURANCE_LEVEL_CHANGE", "CREDENTIAL_CHANGE",
    "CREDENTIAL_COMPROMISE", "DEVICE_COMPLIANCE_CHANGE", "RISC_SESSIONS_REVOKED", "RISK_LEVEL_CHANGE",
    "SESSION_REVOKED", "STREAM_UPDATED", "SUPPORTED_EVENTS", "TOKEN_CLAIMS_CHANGE", "VERIFICATION", "Action",
    "MappingOptions", "Plan", "opaque_kind", "plan",
]

CAEP: Final = "https://schemas.openid.net/secevent/caep/event-type/"
RISC: Final = "https://schemas.openid.net/secevent/risc/event-type/"
SSF: Final = "https://schemas.openid.net/secevent/ssf/event-type/"

SESSION_REVOKED: Final = CAEP + "session-revoked"
CREDENTIAL_CHANGE: Final = CAEP + "credential-change"
TOKEN_CLAIMS_CHANGE: Final = CAEP + "token-claims-change"
ASSURANCE_LEVEL_CHANGE: Final = CAEP + "assurance-level-change"
DEVICE_COMPLIANCE_CHANGE: Final = CAEP + "device-compliance-change"
RISK_LEVEL_CHANGE: Final = CAEP + "risk-level-change"
CREDENTIAL_COMPROMISE: Final = RISC + "credential-compromise"
ACCOUNT_DISABLED: Final = RISC + "account-disabled"
ACCOUNT_ENABLED: Final = RISC + "account-enabled"
ACCOUNT_PURGED: Final = RISC + "account-purged"
RISC_SESSIONS_REVOKED: Final = RISC + "sessions-revoked"
VERIFICATION: Final = SSF + "verification"
STREAM_UPDATED: Final = SSF + "stream-updated"

_CHANGE_TYPES = frozenset({"create", "revoke", "update", "delete"})
_COMPLIANCE = frozenset({"compliant", "not-compliant"})
_RISK_LEVELS = frozenset({"LOW", "MEDIUM", "HIGH"})
_STREAM_STATUSES = frozenset({"enabled", "paused", "disabled"})


@dataclass(frozen=True, slots=True)
class Action:
    """One Guard operation: ``getattr(guard, op)(*args)`` (or its ``a``-twin on the event loop)."""

    op: str
    args: tuple[Any, ...] = ()
    issuer: str | None = None  # the principal's issuer (``issuer=``), when the subject names it

    def describe(self) -> str:
        issuer = [] if self.issuer is None else [f"issuer={self.issuer!r}"]
        return f"{self.op}({', '.join([*(repr(a) for a in self.args), *issuer])})"


@dataclass(frozen=True, slots=True)
class Plan:
    """What to do for one event: the operations, or a note on why there is nothing to do."""

    actions: tuple[Action, ...] = ()
    note: str = ""


@dataclass(frozen=True, slots=True)
class MappingOptions:
    """The choices of the mapping (the receiver's keyword arguments of the same names)."""

    on_high_risk: Literal["raise_risk", "report_compromise"] = "raise_risk"
    risk_amount: int = 100
    risk_window: float = 900.0
    on_credential_change: Literal["rotate", "revoke_principal"] = "rotate"
    assurance_levels: Mapping[str, str] = field(default_factory=dict)


def _str(payload: Mapping[str, Any], name: str, *, required: bool = True, choices: frozenset[str] | None = None,
         limit: int = 256) -> str | None:
    value = payload.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value or len(value) > limit:
        raise SETError("invalid_request", f"the event needs {name} as a string of at most {limit} characters")
    if choices is not None and value not in choices:
        raise SETError("invalid_request", f"{name} must be one of {', '.join(sorted(choices))}")
    return value


_NOTHING = "the subject names nothing that this receiver holds"


def _principal(targets: Targets, action: Callable[[str], Plan]) -> Plan:
    return action(targets.principal) if targets.principal is not None else Plan(note=_NOTHING)


def _session_revoked(e: SecurityEvent, t: Targets, o: MappingOptions) -> Plan:
    if t.session is not None:
        return Plan((Action("revoke_session", (t.session,)),))
    return _principal(t, lambda sub: Plan((Action("revoke_sessions", (sub, e.event_timestamp)),)))


def _credential_change(e: SecurityEvent, t: Targets, o: MappingOptions) -> Plan:
    _str(e.payload, "credential_type")
    if _str(e.payload, "change_type", choices=_CHANGE_TYPES) == "create":
        return Plan(note="a credential was created: nothing to refuse")
    return _principal(t, lambda sub: Plan((Action(o.on_credential_change, (sub,)),)))


def _scopes(claims: Mapping[str, Any]) -> list[str] | None:
    for name in ("scope", "scp"):
        if name not in claims:
            continue
        value = claims[name]
        scopes = value.split() if isinstance(value, str) else value
        if not isinstance(scopes, list) or not all(isinstance(s, str) and s and len(s) <= 256 for s in scopes):
            raise SETError("invalid_request", f"claims.{name} must be a scope string or a list of scopes")
        return sorted(set(scopes))
    return None


def _token_claims_change(e: SecurityEvent, t: Targets, o: MappingOptions) -> Plan:
    claims = e.payload.get("claims")
    if not isinstance(claims, dict) or not claims:
        raise SETError("invalid_request", "the event needs claims as a non-empty JSON object")
    scopes = _scopes(claims)
    if scopes is None:
        return Plan(note="no scope claim changed; other claims are not enforced here")
    return _principal(t, lambda sub: Plan((Action("set_privileges", (sub, scopes)),)))


def _assurance_level_change(e: SecurityEvent, t: Targets, o: MappingOptions) -> Plan:
    _str(e.payload, "namespace")
    current = _str(e.payload, "current_level")
    _str(e.payload, "previous_level", required=False)
    _str(e.payload, "change_direction", required=False, choices=frozenset({"increase", "decrease"}))
    assert current is not None
    level = o.assurance_levels.get(current, current)
    return _principal(t, lambda sub: Plan((Action("set_assurance", (sub, level, e.event_timestamp)),)))


def _device_compliance_change(e: SecurityEvent, t: Targets, o: MappingOptions) -> Plan:
    _str(e.payload, "previous_status", choices=_COMPLIANCE)
    current = _str(e.payload, "current_status", choices=_COMPLIANCE)
    if t.device is None:
        return Plan(note="the subject names no device")
    return Plan((Action("set_device_status", (t.device, current == "compliant")),))


def _risk_level_change(e: SecurityEvent, t: Targets, o: MappingOptions) -> Plan:
    entity = (_str(e.payload, "principal") or "").upper()
    level = (_str(e.payload, "current_level") or "").upper()
    previous = _str(e.payload, "previous_level", required=False)
    if level not in _RISK_LEVELS or (previous is not None and previous.upper() not in _RISK_LEVELS):
        raise SETError("invalid_request", "risk levels must be one of LOW, MEDIUM, HIGH")
    if level != "HIGH":
        return Plan(note=f"risk level {level}: nothing to refuse (a raised risk lapses after its window)")
    if entity not in ("USER", "SESSION"):
        return Plan(note="only the risk of a USER (or a SESSION) is acted on here")
    if o.on_high_risk == "report_compromise":
        return _compromise(t if entity == "USER" else Targets(session=t.session))
    if entity != "USER":
        return Plan(note="a session's risk is not tracked here (on_high_risk='report_compromise' acts on it)")
    return _principal(t, lambda sub: Plan((Action("raise_risk", (sub, o.risk_amount, o.risk_window)),)))


def _compromise(t: Targets) -> Plan:
    if t.principal is None and t.session is None:
        return Plan(note=_NOTHING)
    return Plan((Action("report_compromise", (t.principal, t.session)),))


def _credential_compromise(e: SecurityEvent, t: Targets, o: MappingOptions) -> Plan:
    _str(e.payload, "credential_type")
    return _compromise(t)


def _account_disabled(e: SecurityEvent, t: Targets, o: MappingOptions) -> Plan:
    _str(e.payload, "reason", required=False)
    return _principal(t, lambda sub: Plan((Action("disable_principal", (sub,)),)))


def _account_enabled(e: SecurityEvent, t: Targets, o: MappingOptions) -> Plan:
    return _principal(t, lambda sub: Plan((Action("enable_principal", (sub,)),)))


def _sessions_revoked(e: SecurityEvent, t: Targets, o: MappingOptions) -> Plan:
    return _principal(t, lambda sub: Plan((Action("revoke_sessions", (sub, e.event_timestamp)),)))


def _verification(e: SecurityEvent, t: Targets, o: MappingOptions) -> Plan:
    _str(e.payload, "state", required=False, limit=4096)
    return Plan(note="stream verification")


def _stream_updated(e: SecurityEvent, t: Targets, o: MappingOptions) -> Plan:
    status = _str(e.payload, "status", choices=_STREAM_STATUSES)
    return Plan(note=f"the transmitter set the stream {status}")


_Handler = Callable[[SecurityEvent, Targets, MappingOptions], Plan]
_HANDLERS: Final[dict[str, _Handler]] = {
    SESSION_REVOKED: _session_revoked,
    CREDENTIAL_CHANGE: _credential_change,
    TOKEN_CLAIMS_CHANGE: _token_claims_change,
    ASSURANCE_LEVEL_CHANGE: _assurance_level_change,
    DEVICE_COMPLIANCE_CHANGE: _device_compliance_change,
    RISK_LEVEL_CHANGE: _risk_level_change,
    CREDENTIAL_COMPROMISE: _credential_compromise,
    ACCOUNT_DISABLED: _account_disabled,
    ACCOUNT_PURGED: _account_disabled,
    ACCOUNT_ENABLED: _account_enabled,
    RISC_SESSIONS_REVOKED: _sessions_revoked,
    VERIFICATION: _verification,
    STREAM_UPDATED: _stream_updated,
}

#: every event type this receiver acts on (others are accepted and ignored)
SUPPORTED_EVENTS: Final = frozenset(_HANDLERS)

#: the operations that name a principal (they take ``issuer=``)
_PRINCIPAL_OPS = frozenset({"revoke_sessions", "rotate", "revoke_principal", "set_privileges", "set_assurance",
                            "raise_risk", "report_compromise", "disable_principal", "enable_principal"})

_OPAQUE_KIND = {SESSION_REVOKED: "session", DEVICE_COMPLIANCE_CHANGE: "device", VERIFICATION: "stream",
                STREAM_UPDATED: "stream"}


def opaque_kind(event_type: str) -> str:
    """What a simple ``opaque`` subject names for this event type (see :mod:`sa_middleware.events.subjects`)."""
    return _OPAQUE_KIND.get(event_type, "principal")


def plan(event: SecurityEvent, targets: Targets, options: MappingOptions) -> Plan:
    """The Guard operations for ``event``; raise :class:`SETError` when its payload breaks its definition."""
    handler = _HANDLERS.get(event.event_type)
    if handler is None:
        return Plan(note="event type not supported: ignored")
    result = handler(event, targets, options)  # validates the payload even when the event is then discarded
    if targets.discard is not None:
        return Plan(note=targets.discard)
    if targets.issuer is not None and targets.principal is not None:
        result = Plan(tuple(replace(a, issuer=targets.issuer) if a.op in _PRINCIPAL_OPS else a
                            for a in result.actions), result.note)
    return result
