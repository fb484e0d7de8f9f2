"""The values exchanged between the Guard and a store: what to ask (Admission), what is stored, what comes back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .frozen import fast_init
from .policy import EffectivePolicy

__all__ = [
    "Admission", "AuditKind", "AuditRecord", "LockHolder", "LockInfo", "LockRequest", "Marker", "PrincipalState",
    "SessionInfo", "SessionStatus", "Snapshot", "Ticket", "TicketRecord", "Verdict", "storable_text",
]

SessionStatus = Literal["active", "paused", "revoked", "compromised"]
#: ``denial`` a refused request; ``admission`` an admitted one (``Guard(audit_admissions=True)``, and ``fail_open``);
#: ``operation`` an operation (operator, CLI, security event); ``change`` a state change the store decided or
#: detected (``session_paused``, ``session_evicted``, ``state_loss``) and ``audit_dropped``
AuditKind = Literal["denial", "admission", "operation", "change"]
Kind = Literal["human", "service", "agent"]


def storable_text(text: str) -> str:
    """``text`` with the code points UTF-8 cannot encode (lone surrogates) escaped as ``\\udXXX``."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


@fast_init
@dataclass(frozen=True, slots=True)
class LockRequest:
    key: str
    mode: Literal["exclusive", "shared"] = "exclusive"


@dataclass(slots=True)  # not frozen: built on every request, and a frozen dataclass is four times slower to build
class Admission:
    """Everything a store needs to decide one request atomically. Built by the Guard, pure data: nothing changes it
    once built."""

    ticket_id: str
    sub: str
    kind: str
    session_id: str
    token_hash: str
    token_exp: float
    token_iat: float | None
    token_gen: int | None
    jti: str | None
    actor: str | None
    credential: str | None
    device: str | None
    client: str
    user_agent: str
    route: str
    token_scopes: frozenset[str] = frozenset()
    auth_time: float | None = None
    acr: str | None = None
    #: the route's policy, every field resolved; the rule (``rules.py`` and the Lua script) reads its fields by name
    policy: EffectivePolicy = field(default_factory=EffectivePolicy)
    #: the policy's lock templates rendered for this request (one object, one key)
    locks: tuple[LockRequest, ...] = ()
    # timing
    lease: float = 30.0
    session_idle: float = 900.0
    # audit trail: record the admission too (Guard(audit_admissions=True)); record an object_locked refusal (False
    # while the Guard waits for the lock and retries: it records the final refusal itself)
    audit_admitted: bool = False
    audit_locked: bool = True
    #: the token's issuer (its verified ``iss`` claim; "" when the token has none): principal state is kept per
    #: issuer and subject, so two issuers' principals with the same ``sub`` never share state
    iss: str = ""


@dataclass(slots=True)
class PrincipalState:
    generation: int = 0
    not_before: float | None = None
    risk: list[tuple[int, float]] = field(default_factory=list)  # (amount, until)
    privileges: frozenset[str] | None = None
    privileges_at: float | None = None
    # set by security events (sa_middleware.events): see Store.revoke_sessions, disable_principal, set_assurance
    sessions_before: float | None = None  # a token issued at or before this cannot hold a session
    disabled_at: float | None = None  # the account is disabled: every token is refused
    assurance: str | None = None  # the assurance level (acr) that replaces older tokens' acr for step-up
    assurance_at: float | None = None


@fast_init
@dataclass(frozen=True, slots=True)
class Marker:
    """A compromise marker: tokens of this principal / actor / credential / device issued before ``at`` (or
    with a generation <= ``generation``) cannot open a new context."""

    at: float
    generation: int | None = None


@dataclass(slots=True)
class SessionInfo:
    """One context of a principal, as stored (and as listed by ``Guard.sessions``)."""

    session_id: str
    sub: str
    kind: str
    status: SessionStatus
    created: float
    last_seen: float
    expires: float
    client: str = ""
    user_agent: str = ""
    device: str | None = None
    credential: str | None = None
    actor: str | None = None
    marked_at: float | None = None
    marked_generation: int | None = None
    cleared_at: float | None = None
    iss: str = ""  # the principal's issuer ("": a token without ``iss``, or a session stored before issuers)


@dataclass(slots=True)  # not frozen: built on every admission (stores replace it rather than change it)
class TicketRecord:
    ticket_id: str
    sub: str
    session_id: str
    token_hash: str
    client: str  # "address|user agent": two different values for one token in flight = token_reuse
    tags: frozenset[str]
    conflicts: frozenset[str]
    exclusive: bool
    expires: float


@fast_init
@dataclass(frozen=True, slots=True)
class LockHolder:
    ticket_id: str
    mode: str
    sub: str
    session_id: str
    kind: str
    expires: float
    iss: str = ""


@dataclass(frozen=True, slots=True)
class LockInfo:
    """A held object lock, as listed by ``Guard.locks``."""

    key: str
    mode: str
    fencing_token: int
    ticket_id: str
    sub: str
    session_id: str
    expires: float
    iss: str = ""


@dataclass(slots=True)
class Snapshot:
    """The state a store reads, inside its transaction, to decide one admission. Only live rows are included."""

    now: float
    principal: PrincipalState
    sessions: list[SessionInfo]
    tickets: list[TicketRecord]
    lock_holders: dict[str, list[LockHolder]]
    fences: dict[str, int]
    device_compliant: bool | None = None
    jti_seen: bool = False
    markers: list[Marker] = field(default_factory=list)  # principal, actor, credential and device markers


@fast_init
@dataclass(frozen=True, slots=True)
class Ticket:
    """An admitted request: hand it back to ``release``."""

    ticket_id: str
    sub: str
    session_id: str
    fencing_tokens: dict[str, int]
    expires: float
    iss: str = ""


@dataclass(slots=True)
class Verdict:
    """The outcome of the rule function: a Ticket or a denial code, and the writes the store must apply.

    Writes are applied whether the request is admitted or not (a newer generation ratchets even if the request is
    then refused for another reason; a lock conflict may pause a session).
    """

    ticket: Ticket | None = None
    code: str | None = None
    detail: str = ""
    retry_after: int | None = None
    new_generation: int | None = None
    risk: list[tuple[int, float]] | None = None
    session: SessionInfo | None = None
    session_status: dict[str, SessionStatus] = field(default_factory=dict)
    ticket_record: TicketRecord | None = None
    lock_grants: list[tuple[str, str, int]] = field(default_factory=list)  # key, mode, fencing token
    record_jti: bool = False


@fast_init
@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One entry of the audit trail (``Guard.audit``, ``sa-middleware audit``).

    ``code`` is the denial code (kind ``denial``), ``admitted`` / ``fail_open`` (kind ``admission``), the operation's
    name, e.g. ``rotate`` (kind ``operation``), or ``session_paused`` / ``session_evicted`` / ``state_loss`` /
    ``audit_dropped`` (kind ``change``). ``source`` is ``middleware``, ``operator`` (Python calls), ``cli``,
    ``event:<type>`` (a security event) or ``store``. ``detail`` is short and never holds a token. ``time`` is
    seconds since the epoch; ``None`` only on a record handed to a store, which then stamps it with its own clock.
    """

    kind: AuditKind
    code: str
    source: str
    sub: str | None = None
    session_id: str | None = None
    route: str | None = None
    detail: str = ""
    time: float | None = None

    def __post_init__(self) -> None:
        # a value UTF-8 cannot encode (a lone surrogate from a JSON escape in a token) would make every store refuse
        # the record and the batch it rides in: it is kept with those code points escaped (as \ud800)
        for name in ("code", "source", "sub", "session_id", "route", "detail"):
            value = getattr(self, name)
            if isinstance(value, str) and not value.isascii():
                object.__setattr__(self, name, storable_text(value))

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dict (``sa-middleware audit --json``)."""
        return {"time": self.time, "kind": self.kind, "code": self.code, "source": self.source, "sub": self.sub,
                "session_id": self.session_id, "route": self.route, "detail": self.detail}
