"""The in-process store (``memory://``): for tests and single-process apps; nothing survives the process.

State lives in Python dicts, indexed for the admission path (a principal's sessions and tickets, a key's locks),
under one lock: every operation is atomic, and admissions are decided by the same rule function as the SQLite store
(:func:`sa_middleware.rules.evaluate`) on the same snapshot. Operations are cheap and never wait on I/O, so the
async twins run inline on the event loop. Expired entries are swept every ten seconds.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from typing import Any

from ..denials import Denial
from ..errors import ConfigurationError, StoreUnavailable
from ..records import (
    Admission,
    AuditRecord,
    LockHolder,
    LockInfo,
    Marker,
    PrincipalState,
    SessionInfo,
    SessionStatus,
    Snapshot,
    Ticket,
    TicketRecord,
    Verdict,
)
from ..rules import FENCE_SLACK, STATUS_RETENTION, evaluate, live_risk, seen_again
from .base import Store
from .sqlite import _admission_audit, _outcome

__all__ = ["MemoryStore"]

_PRUNE_EVERY = 10.0  # seconds between sweeps of expired entries
_AUDIT_DETAIL = 512  # characters of an audit detail kept
_FROM_STATES: dict[str, tuple[str, ...]] = {
    "paused": ("active", "paused"), "revoked": ("active", "paused", "compromised", "revoked"),
    "compromised": ("active", "paused", "compromised"), "active": ("active",)}

_Who = tuple[str, str]  # (iss, sub)


@dataclass(slots=True)
class _Principal:
    state: PrincipalState = field(default_factory=PrincipalState)
    marker_at: float | None = None
    marker_generation: int | None = None
    gen_claim: bool | None = None  # whether the principal's latest token carried a generation claim


@dataclass(slots=True)
class _Lock:
    mode: str
    sub: str
    session_id: str
    kind: str
    fence: int
    expires: float
    iss: str


@dataclass(slots=True)
class _Held:
    """A live ticket: its record, the principal it counts for and the lock keys it holds."""

    record: TicketRecord
    who: _Who
    keys: tuple[str, ...]


class _Closed:
    """The lock of a closed store: entering it raises StoreUnavailable (a closed store answers nothing, as the
    SQLite and Redis stores do)."""

    def __enter__(self) -> None:
        raise StoreUnavailable("memory store closed")

    def __exit__(self, *exc: object) -> None:  # never entered
        pass


class MemoryStore(Store):
    """Thread- and task-safe store that lives in this process only."""

    inline_async = True

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock: AbstractContextManager[Any] = threading.RLock()  # the store's one lock
        self._principals: dict[_Who, _Principal] = {}
        self._sessions: dict[str, SessionInfo] = {}
        self._owned: dict[_Who, dict[str, None]] = {}  # (iss, sub) -> its session ids
        self._tickets: dict[str, _Held] = {}
        self._in_flight: dict[_Who, dict[str, TicketRecord]] = {}
        self._locks: dict[str, dict[str, _Lock]] = {}  # key -> ticket id -> lock
        self._fences: dict[str, int] = {}
        self._devices: dict[str, bool] = {}
        self._jtis: dict[str, float] = {}
        self._markers: dict[tuple[str, str], float] = {}  # (credential | device, value) -> at
        self._events: dict[str, float] = {}
        self._audit: deque[tuple[int, AuditRecord]] = deque()
        self._audit_id = 0
        self._last_prune = 0.0
        self._key_generation = 0
        self._dropped_keys: dict[str, None] = {}

    def close(self) -> None:
        """Forget nothing, answer nothing: every later call raises StoreUnavailable."""
        self._lock = _Closed()

    @classmethod
    def from_uri(cls, uri: str, **options: Any) -> MemoryStore:
        return cls(**options)

    # -- indexed writes ------------------------------------------------------------------------------------------

    def _put_session(self, s: SessionInfo) -> None:
        old = self._sessions.get(s.session_id)
        self._sessions[s.session_id] = s
        if old is not None and old.iss == s.iss and old.sub == s.sub:
            return  # indexed already (a session seen again)
        if old is not None:
            self._unindex(old)
        self._owned.setdefault((s.iss, s.sub), {})[s.session_id] = None

    def _unindex(self, s: SessionInfo) -> None:
        owned = self._owned.get((s.iss, s.sub))
        if owned is not None:
            owned.pop(s.session_id, None)
            if not owned:
                del self._owned[(s.iss, s.sub)]

    def _principal(self, iss: str, sub: str) -> _Principal:
        """The principal's state, created on first use (from the issuer-less state of the subject, if any)."""
        p = self._principals.get((iss, sub))
        if p is None:
            p = self._adopted(iss, sub) or _Principal()
            self._principals[(iss, sub)] = p
        return p

    def _known(self, iss: str, sub: str) -> _Principal | None:
        """The principal's state if the store has any for it (adopting the subject's issuer-less state)."""
        p = self._principals.get((iss, sub))
        if p is None and iss and ("", sub) in self._principals:
            p = self._principal(iss, sub)
        return p

    def _adopted(self, iss: str, sub: str) -> _Principal | None:
        """A copy of the state kept for ``sub`` without an issuer, for the issuer's principal on its first use."""
        if not iss or (plain := self._principals.get(("", sub))) is None:
            return None
        st = plain.state
        return _Principal(replace(st, risk=list(st.risk)), plain.marker_at, plain.marker_generation)

    def _drop_ticket(self, ticket_id: str) -> None:
        held = self._tickets.pop(ticket_id, None)
        if held is None:
            return
        flight = self._in_flight.get(held.who)
        if flight is not None:
            flight.pop(ticket_id, None)
            if not flight:
                del self._in_flight[held.who]
        for key in held.keys:
            holders = self._locks.get(key)
            if holders is not None:
                holders.pop(ticket_id, None)
                if not holders:
                    del self._locks[key]

    # -- admission -----------------------------------------------------------------------------------------------

    def admit(self, admission: Admission) -> Ticket | Denial:
        with self._lock:
            now = self._clock()
            if now - self._last_prune > _PRUNE_EVERY:
                self._prune(now)
            a = admission
            verdict = evaluate(a, self._snapshot(now, a))
            if verdict.ticket is not None and not verdict.session_status and not a.audit_admitted:
                self._apply(now, a, verdict)  # the usual admission: nothing for the audit trail
                return verdict.ticket
            before: dict[str, tuple[str, str]] = {sid: (s.sub, s.status) for sid in verdict.session_status
                      if (s := self._sessions.get(sid)) is not None}
            self._apply(now, a, verdict)
            self._add_audit(now, _admission_audit(a, verdict, before))
            return _outcome(verdict)

    def _snapshot(self, now: float, a: Admission) -> Snapshot:
        markers: list[Marker] = []
        who = (a.iss, a.sub)
        p = self._known(a.iss, a.sub)
        if p is not None and p.marker_at is not None:
            markers.append(Marker(p.marker_at, p.marker_generation))
        if a.actor is not None:
            actor = self._known(a.iss, a.actor)
            if actor is not None and actor.marker_at is not None:
                markers.append(Marker(actor.marker_at, None))
        sessions = [s for sid in self._owned.get(who, ()) if (s := self._sessions[sid]).expires > now]
        own = self._sessions.get(a.session_id)
        if own is not None and (own.iss, own.sub) != who and own.expires > now:
            sessions.append(own)
        flight = self._in_flight.get(who)
        tickets = [t for t in flight.values() if t.expires > now] if flight else []
        holders: dict[str, list[LockHolder]] = {}
        fences: dict[str, int] = {}
        for lock in a.locks:
            held = self._locks.get(lock.key)
            if held:
                live = [LockHolder(tid, h.mode, h.sub, h.session_id, h.kind, h.expires, h.iss)
                        for tid, h in held.items() if h.expires > now]
                if live:
                    holders[lock.key] = live
            if lock.key in self._fences:
                fences[lock.key] = self._fences[lock.key]
        device = self._devices.get(a.device) if a.device is not None else None
        jti_seen = a.policy.one_time and self._jtis.get(a.jti or "", 0.0) > now
        for kind, value in (("credential", a.credential), ("device", a.device)):
            if value is not None and (at := self._markers.get((kind, value))) is not None:
                markers.append(Marker(at))
        return Snapshot(now, p.state if p is not None else PrincipalState(), sessions, tickets, holders, fences,
                        device, jti_seen, markers)

    def _apply(self, now: float, a: Admission, v: Verdict) -> None:
        if v.new_generation is not None or v.risk is not None:
            st = self._principal(a.iss, a.sub).state
            st.generation = max(st.generation, v.new_generation or 0)
            if v.risk is not None:
                st.risk = list(v.risk)
        if v.session is not None and not seen_again(v.session, self._sessions.get(a.session_id), a.session_idle):
            self._put_session(v.session)
        for session_id, status in v.session_status.items():
            if v.session is not None and session_id == v.session.session_id:
                continue
            self._set_status(session_id, status, now)
        if v.ticket_record is not None:
            t = v.ticket_record
            keys = tuple([key for key, _, _ in v.lock_grants]) if v.lock_grants else ()
            self._tickets[t.ticket_id] = _Held(t, (a.iss, a.sub), keys)
            self._in_flight.setdefault((a.iss, a.sub), {})[t.ticket_id] = t
            for key, mode, fence in v.lock_grants:
                self._locks.setdefault(key, {})[t.ticket_id] = _Lock(mode, a.sub, a.session_id, a.kind, fence,
                                                                     t.expires, a.iss)
                self._fences[key] = fence
        if v.record_jti and a.jti is not None:
            self._jtis[a.jti] = a.token_exp

    def _set_status(self, session_id: str, status: SessionStatus, now: float) -> bool:
        """Change a session's status if its current one allows it; the status is remembered past the token's
        expiry (pausing never overrides revoked or compromised)."""
        s = self._sessions.get(session_id)
        if s is None or s.status not in _FROM_STATES[status]:
            return False
        s.status, s.expires = status, max(s.expires, now + STATUS_RETENTION)
        return True

    def release(self, ticket: Ticket) -> None:
        with self._lock:
            self._drop_ticket(ticket.ticket_id)

    def renew(self, tickets: Sequence[Ticket], lease: float) -> None:
        with self._lock:
            now = self._clock()
            for ticket_id in (t.ticket_id for t in tickets):
                held = self._tickets.get(ticket_id)
                if held is None:
                    continue
                if held.record.expires > now:
                    held.record = replace(held.record, expires=now + lease)
                    self._in_flight[held.who][ticket_id] = held.record
                for key in held.keys:
                    lock = self._locks.get(key, {}).get(ticket_id)
                    if lock is not None and lock.expires > now:
                        lock.expires = now + lease

    def _prune(self, now: float) -> None:
        self._last_prune = now
        for ticket_id in [tid for tid, held in self._tickets.items() if held.record.expires <= now]:
            self._drop_ticket(ticket_id)
        for key in list(self._locks):
            holders = self._locks[key]
            for ticket_id in [tid for tid, lock in holders.items() if lock.expires <= now]:
                del holders[ticket_id]
            if not holders:
                del self._locks[key]
        for s in [s for s in self._sessions.values() if s.expires <= now]:
            del self._sessions[s.session_id]
            self._unindex(s)
        for table in (self._jtis, self._events):
            for key in [k for k, expires in table.items() if expires <= now]:
                del table[key]
        # fencing counters of keys without a live lock that lag the clock: rules.next_fence restarts above them
        floor = math.floor((now - FENCE_SLACK) * 1_000_000)
        for key in [k for k, value in self._fences.items() if value < floor and k not in self._locks]:
            del self._fences[key]
        self._prune_audit(now)

    # -- operations ----------------------------------------------------------------------------------------------

    def rotate(self, sub: str, iss: str = "") -> int:
        with self._lock:
            st = self._principal(iss, sub).state
            st.generation += 1
            return st.generation

    def revoke_principal(self, sub: str, iss: str = "") -> float:
        with self._lock:
            now = self._clock()
            st = self._principal(iss, sub).state
            st.not_before = max(st.not_before or 0, now)
            return now

    def revoke_session(self, session_id: str) -> bool:
        with self._lock:
            now = self._clock()
            s = self._sessions.get(session_id)
            if s is not None:
                s.status, s.expires = "revoked", max(s.expires, now + STATUS_RETENTION)
                return True
            self._put_session(SessionInfo(session_id, "", "", "revoked", now, now, now + STATUS_RETENTION))
            return False

    def report_compromise(self, sub: str | None, session_id: str | None, iss: str = "") -> list[str]:
        if sub is None and session_id is None:
            raise ConfigurationError("report_compromise needs sub or session_id")
        with self._lock:
            now = self._clock()
            principal, issuer = sub, iss
            origins: list[tuple[str | None, str | None]] = []
            row = None
            if session_id is not None:
                row = self._sessions.get(session_id)
                if row is not None and row.sub == "":
                    row = None
                if row is None and principal is None:
                    return []
                if row is not None:
                    if principal is None:
                        principal, issuer = row.sub, row.iss
                    origins = [(row.credential, row.device)]
            assert principal is not None
            if session_id is None or row is None:
                origins = [(s.credential, s.device) for sid in self._owned.get((issuer, principal), ())
                           if (s := self._sessions[sid]).expires > now]
            credentials = {c for c, _ in origins if c}
            devices = {d for _, d in origins if d}
            p = self._principal(issuer, principal)
            p.marker_at, p.marker_generation = now, p.state.generation
            for kind, values in (("credential", credentials), ("device", devices)):
                for value in values:
                    self._markers[(kind, value)] = now
            marked = []
            for s in self._sessions.values():
                if s.expires <= now or s.status == "revoked":
                    continue
                if not ((s.iss == issuer and principal in (s.sub, s.actor)) or s.credential in credentials
                        or s.device in devices):
                    continue
                owner = self._principals.get((s.iss, s.sub))
                s.status, s.marked_at, s.expires = "compromised", now, max(s.expires, now + STATUS_RETENTION)
                s.marked_generation = owner.state.generation if owner is not None else None
                marked.append(s.session_id)
            return sorted(marked)

    def pause_session(self, session_id: str) -> bool:
        with self._lock:
            return self._set_status(session_id, "paused", self._clock())

    def resume_session(self, session_id: str) -> bool:
        with self._lock:
            s = self._sessions.get(session_id)
            if s is None or s.status not in ("paused", "compromised"):
                return False
            s.status, s.cleared_at, s.marked_at, s.marked_generation = "active", self._clock(), None, None
            return True

    def set_device_status(self, device_id: str, compliant: bool) -> None:
        with self._lock:
            self._devices[device_id] = bool(compliant)

    def set_privileges(self, sub: str, scopes: Iterable[str] | None, iss: str = "") -> None:
        value = None if scopes is None else frozenset(scopes)
        with self._lock:
            st = self._principal(iss, sub).state
            st.privileges, st.privileges_at = value, self._clock()

    def revoke_sessions(self, sub: str, before: float | None, iss: str = "") -> list[str]:
        with self._lock:
            now = self._clock()
            cut = now if before is None else min(before, now)
            st = self._principal(iss, sub).state
            st.sessions_before = cut if st.sessions_before is None else max(st.sessions_before, cut)
            marked = []
            for sid in self._owned.get((iss, sub), ()):
                s = self._sessions[sid]
                if s.created <= cut and s.expires > now and s.status != "revoked":
                    s.status, s.expires = "revoked", max(s.expires, now + STATUS_RETENTION)
                    marked.append(sid)
            return sorted(marked)

    def disable_principal(self, sub: str, iss: str = "") -> float:
        with self._lock:
            now = self._clock()
            st = self._principal(iss, sub).state
            st.disabled_at = st.disabled_at if st.disabled_at is not None else now
            st.not_before = max(st.not_before or 0, now)
            return now

    def enable_principal(self, sub: str, iss: str = "") -> bool:
        with self._lock:
            p = self._known(iss, sub)
            if p is None or p.state.disabled_at is None:
                return False
            p.state.disabled_at = None
            return True

    def set_assurance(self, sub: str, level: str | None, at: float | None, iss: str = "") -> None:
        with self._lock:
            now = self._clock()
            st = self._principal(iss, sub).state
            st.assurance = level
            st.assurance_at = None if level is None else (now if at is None else min(at, now))

    def raise_risk(self, sub: str, amount: int, window: float, iss: str = "") -> None:
        with self._lock:
            now = self._clock()
            st = self._principal(iss, sub).state
            st.risk = [*live_risk(st.risk, now), (amount, now + window)]

    def seen_event(self, key: str, ttl: float) -> bool:
        with self._lock:
            now = self._clock()
            if self._events.get(key, -math.inf) > now:
                return True
            self._events[key] = now + ttl
            return False

    def forget_event(self, key: str) -> None:
        with self._lock:
            self._events.pop(key, None)

    def all_sessions(self, session_idle: float, limit: int) -> list[SessionInfo]:
        with self._lock:
            now = self._clock()
            found = [replace(s) for s in self._sessions.values()
                     if s.sub != "" and s.expires > now and s.last_seen > now - session_idle]
        return sorted(found, key=lambda s: (-s.last_seen, s.session_id))[:limit]

    def session_owner(self, session_id: str) -> str | None:
        with self._lock:
            s = self._sessions.get(session_id)
            return s.sub if s is not None and s.sub != "" else None

    def note_keys(self, drop: str | None) -> int:
        with self._lock:
            self._key_generation += 1
            if drop is not None:
                self._dropped_keys[drop] = None
            return self._key_generation

    def key_notes(self) -> tuple[int, tuple[str, ...]]:
        with self._lock:
            return self._key_generation, tuple(sorted(self._dropped_keys))

    def note_generation_claims(self, notes: Mapping[tuple[str, str], bool]) -> None:
        with self._lock:
            for (iss, sub), present in notes.items():
                self._principal(iss, sub).gen_claim = bool(present)

    def generation_claim(self, sub: str, iss: str = "") -> bool | None:
        with self._lock:
            p = self._principals.get((iss, sub))
            return None if p is None else p.gen_claim

    def reset_generation(self, sub: str, iss: str = "") -> int:
        with self._lock:
            p = self._known(iss, sub)
            if p is None:
                return 0
            was, p.state.generation = p.state.generation, 0
            return was

    def sessions(self, sub: str, session_idle: float, iss: str = "") -> list[SessionInfo]:
        with self._lock:
            now = self._clock()
            found = [replace(s) for sid in self._owned.get((iss, sub), ())
                     if (s := self._sessions[sid]).expires > now and s.last_seen > now - session_idle]
        return sorted(found, key=lambda s: (s.created, s.session_id))

    def issuers(self, sub: str) -> list[str]:
        with self._lock:
            now = self._clock()
            found = {iss for iss, who in self._principals if who == sub}
            found.update(iss for (iss, who), ids in self._owned.items() if who == sub
                         and any(self._sessions[sid].expires > now for sid in ids))
        return sorted(found)

    def locks(self) -> list[LockInfo]:
        with self._lock:
            now = self._clock()
            found = [LockInfo(key, h.mode, h.fence, tid, h.sub, h.session_id, h.expires, h.iss)
                     for key, holders in self._locks.items() for tid, h in holders.items() if h.expires > now]
        return sorted(found, key=lambda x: (x.key, x.fencing_token))

    # -- the audit trail ----------------------------------------------------------------------------------------

    def _add_audit(self, now: float, records: Sequence[AuditRecord]) -> None:
        for r in records:
            self._audit_id += 1
            self._audit.append((self._audit_id, replace(r, time=now if r.time is None else r.time,
                                                        detail=r.detail[:_AUDIT_DETAIL])))
        while len(self._audit) > self.audit_max_records:
            self._audit.popleft()

    def _prune_audit(self, now: float) -> None:
        cutoff = now - self.audit_retention
        kept = [(i, r) for i, r in self._audit if r.time is not None and r.time >= cutoff]
        if len(kept) != len(self._audit):
            self._audit = deque(kept)

    def record_audit(self, records: Sequence[AuditRecord]) -> None:
        if records:
            with self._lock:
                self._add_audit(self._clock(), records)

    def audit(self, *, sub: str | None = None, session_id: str | None = None, code: str | None = None,
              kind: str | None = None, since: float | None = None, until: float | None = None,
              limit: int = 100) -> list[AuditRecord]:
        with self._lock:
            now = self._clock()
            first = self._audit_id - self.audit_max_records
            low = max(now - self.audit_retention, -math.inf if since is None else since)
            found = [(r.time, i, r) for i, r in self._audit
                     if i > first and r.time is not None and r.time >= low
                     and (until is None or r.time <= until) and (sub is None or r.sub == sub)
                     and (session_id is None or r.session_id == session_id) and (code is None or r.code == code)
                     and (kind is None or r.kind == kind)]
        found.sort(key=lambda x: (x[0], x[1]), reverse=True)
        return [r for _, _, r in found[:limit]]
