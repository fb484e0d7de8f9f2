"""The admission rule: one pure function that every store evaluates inside its own atomic transaction.

The memory and SQLite stores call :func:`evaluate` on a :class:`~sa_middleware.records.Snapshot` read inside one
``BEGIN IMMEDIATE`` transaction and apply the returned writes in the same transaction. The Redis store implements the
same rule in Lua; the conformance suite keeps the two equal. Checks run in the order given on the "Denials" page of
the documentation (docs/denials.md, "Order of checks"), and the first failure wins, so the same state always gives
the same code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import fields
from operator import attrgetter

from .records import Admission, LockRequest, SessionInfo, SessionStatus, Snapshot, Ticket, TicketRecord, Verdict

__all__ = ["FENCE_SLACK", "SEEN_PRECISION", "STATUS_RETENTION", "evaluate", "is_active", "is_newer", "live_risk",
           "next_fence", "owns", "seen_again"]

#: seconds a paused, revoked or compromised session is remembered beyond its last token's expiry, so a refreshed
#: token with the same session id cannot bring it back without an operator
STATUS_RETENTION = 86400.0

#: seconds a lock key's fencing counter outlives the key's last lock (a Redis TTL beyond the lease; SQLite prunes
#: counters that lag the clock by more than this): how far the store clock may step back without reissuing a token
FENCE_SLACK = 60.0

#: seconds a stored session's ``last_seen`` may lag its latest admission (at most; a hundredth of ``session_idle``
#: when that is shorter): a session seen again with nothing else changed is not written again before then
SEEN_PRECISION = 1.0

_ALL_BUT_LAST_SEEN = attrgetter(*(f.name for f in fields(SessionInfo) if f.name != "last_seen"))


def next_fence(last: int, now: float) -> int:
    """The fencing token granted after ``last`` (0: none known) at store time ``now``: above ``last``, and at least
    ``now`` in microseconds. A counter can therefore be forgotten once its key is unused (expired, pruned): the
    next token still exceeds every token issued before, as long as the store clock moves forward. Microseconds
    since the epoch stay below 2**53 (JSON-safe integers) until the year 2255."""
    return max(last + 1, math.floor(now * 1_000_000))


def is_newer(marker_at: float, marker_gen: int | None, token_iat: float | None, token_gen: int | None) -> bool:
    """Whether a token postdates a compromise marker: a higher generation when both carry one; otherwise (a token
    without a generation claim, or a marker of an actor, credential or device) issued after the marker."""
    if marker_gen is not None and token_gen is not None:
        return token_gen > marker_gen
    return token_iat is not None and token_iat > marker_at


def seen_again(session: SessionInfo, stored: SessionInfo | None, session_idle: float) -> bool:
    """Whether an admission's session record may be left as stored: nothing but ``last_seen`` changed, and the
    stored one is less than ``min(SEEN_PRECISION, session_idle / 100)`` seconds old (every store then skips that
    write, the Redis store in Lua; ``is_active`` may count a session idle at most that much early)."""
    return (stored is not None and session.last_seen - stored.last_seen < min(SEEN_PRECISION, session_idle / 100)
            and _ALL_BUT_LAST_SEEN(session) == _ALL_BUT_LAST_SEEN(stored))


def is_active(session: SessionInfo, session_idle: float, now: float) -> bool:
    """Whether a stored session counts as active (for ``max_sessions``): seen within ``session_idle`` seconds, its
    token not expired, and not revoked. Paused and compromised sessions count: they hold their place until an
    operator revokes them or they go idle."""
    return session.status != "revoked" and session.last_seen + session_idle > now and session.expires > now


def owns(session: SessionInfo, a: Admission) -> bool:
    """Whether a stored session may serve the admission's principal: the same subject under the same issuer. A
    session without a subject (revoked before it was seen) serves anyone (and refuses them); one stored without an
    issuer (before issuers were recorded) serves the same subject under any issuer, which then owns it."""
    return session.sub == "" or (session.sub == a.sub and session.iss in ("", a.iss))


def live_risk(entries: list[tuple[int, float]], now: float) -> list[tuple[int, float]]:
    """The risk entries that have not expired."""
    return [(amount, until) for amount, until in entries if until > now]


def _seconds(value: float) -> int:
    return max(1, math.ceil(value))


def evaluate(a: Admission, s: Snapshot) -> Verdict:
    """Decide one admission against a snapshot. Returns the verdict and the writes to apply."""
    now, p, pol, v = s.now, s.principal, a.policy, Verdict()

    # generation ratchet and not-before watermark
    token_gen = a.token_gen if a.token_gen is not None else 0
    if token_gen < p.generation:
        if a.token_gen is None:
            return _deny(v, "stale_generation", "the principal's credential generation was rotated and this token "
                         "carries no generation claim; a new token will not help until an operator resets it")
        return _deny(v, "stale_generation", "the credential generation was superseded; obtain a new token")
    if token_gen > p.generation:
        v.new_generation = token_gen
    if p.not_before is not None and (a.token_iat is None or a.token_iat < p.not_before):
        return _deny(v, "token_revoked", "tokens issued before the principal's revocation are refused")
    if p.disabled_at is not None:
        return _deny(v, "token_revoked", "the principal's account is disabled")

    # session status
    session = None
    for x in s.sessions:
        if x.session_id == a.session_id:
            session = x
            break
    if session is not None and not owns(session, a):
        return _deny(v, "invalid_token", "the session id belongs to another principal")
    if p.sessions_before is not None and (a.token_iat is None or a.token_iat <= p.sessions_before):
        return _deny(v, "session_revoked", "the principal's sessions were revoked; sign in again")
    if session is not None:
        if session.status == "revoked":
            return _deny(v, "session_revoked", "this session was revoked or evicted")
        if session.status == "paused":
            return _deny(v, "session_paused", "this session is paused until an operator resumes it")
        # a compromised session is re-established by a newer token (written "active" only if admitted)
        if session.status == "compromised" and not is_newer(
                session.marked_at or now, session.marked_generation, a.token_iat, a.token_gen):
            return _deny(v, "credential_compromised", "this context is related to a reported compromise; "
                                                       "re-authenticate")

    # compromise markers (principal, actor, credential, device)
    cleared_at = session.cleared_at if session is not None else None
    for marker in s.markers:
        if cleared_at is not None and marker.at <= cleared_at:
            continue
        if not is_newer(marker.at, marker.generation, a.token_iat, a.token_gen):
            return _deny(v, "credential_compromised", "this context is related to a reported compromise; "
                                                       "re-authenticate")

    # reuse and replay
    client = f"{a.client}|{a.user_agent}"
    for t in s.tickets:
        if t.token_hash == a.token_hash and t.client != client:
            return _deny(v, "token_reuse", "this token is in use by another client")
    if pol.one_time and s.jti_seen:
        return _deny(v, "token_replayed", "this one-time token was already used")

    # scopes and step-up
    if pol.scopes:
        granted = a.token_scopes
        if p.privileges is not None and (a.token_iat is None or p.privileges_at is None
                                         or a.token_iat < p.privileges_at):
            granted = granted & p.privileges
        if not pol.scopes <= granted:
            return _deny(v, "insufficient_scope", "required scope missing or withdrawn")
    if pol.max_auth_age is not None and (a.auth_time is None or now - a.auth_time > pol.max_auth_age):
        return _deny(v, "step_up_required", "a more recent authentication is required")
    acr = a.acr
    if p.assurance_at is not None and (a.token_iat is None or a.token_iat < p.assurance_at):
        acr = p.assurance  # the assurance level reported since the token was issued replaces its acr
    if pol.acr_values and acr not in pol.acr_values:
        return _deny(v, "step_up_required", "a stronger authentication is required")

    # device posture
    if pol.require_compliant_device:
        if a.device is None:
            return _deny(v, "device_noncompliant", "the token names no device")
        if s.device_compliant is False:
            return _deny(v, "device_noncompliant", "the device is marked non-compliant")

    # parallel sessions: whichever route made them active (see is_active), the requesting session must be among
    # the principal's max_sessions oldest active sessions ("reject"); "evict_oldest" evicts the oldest others until
    # it is one of at most max_sessions. A session that is not active yet counts as the newest.
    evict: list[str] = []
    if pol.max_sessions is not None:
        others = [x for x in s.sessions if x.session_id != a.session_id and is_active(x, a.session_idle, now)]
        if len(others) > 1:
            others.sort(key=_age)
        if pol.on_session_limit == "evict_oldest":
            evict = [x.session_id for x in others[:max(0, len(others) - pol.max_sessions + 1)]]
        else:
            mine = session if session is not None and is_active(session, a.session_idle, now) else None
            older = others if mine is None else [x for x in others if _age(x) < _age(mine)]
            if len(older) >= pol.max_sessions:
                detail = _at_most(pol.max_sessions, "active session", "is", "are") + " allowed"
                return _deny(v, "too_many_sessions", detail)

    # actions in flight
    if pol.max_in_flight is not None and len(s.tickets) >= pol.max_in_flight:
        return _deny(v, "too_many_in_flight", _at_most(pol.max_in_flight, "request", "may", "may") + " be in flight", 1)
    for t in s.tickets:
        if pol.exclusive or t.exclusive:
            return _deny(v, "conflicting_action", "another action of this principal is in flight", 1)
        if pol.conflicts & t.tags or t.conflicts & pol.tags:
            return _deny(v, "conflicting_action", "a conflicting action of this principal is in flight", 1)

    # risk
    risk = live_risk(p.risk, now) if p.risk else []
    if pol.max_risk is not None:
        level = sum(amount for amount, _ in risk)
        if level > pol.max_risk:
            until = max(u for _, u in risk)
            return _deny(v, "risk_too_high", "a recent action raised this principal's risk", _seconds(until - now))

    # object locks
    grants: list[tuple[str, str, int]] = []
    for req in _merge_locks(a.locks) if a.locks else ():
        held = s.lock_holders.get(req.key)
        blocking = [h for h in held if h.ticket_id != a.ticket_id
                    and (req.mode == "exclusive" or h.mode == "exclusive")] if held else None
        if blocking:
            retry = _seconds(min(h.expires for h in blocking) - now)
            if pol.on_lock_conflict == "pause":
                if a.kind != "human":
                    v.session_status[a.session_id] = "paused"
                    if session is None:
                        v.session = _new_session(a, now, "paused")
                    return _deny(v, "session_paused",
                                 f"{req.key} is being modified by another principal; this session is paused "
                                 "until an operator resumes it")
                for h in blocking:
                    if h.kind != "human":
                        v.session_status[h.session_id] = "paused"
            return _deny(v, "object_locked", f"{req.key} is locked by another request", retry)
        grants.append((req.key, req.mode, next_fence(s.fences.get(req.key, 0), now)))

    # admitted
    for sid in evict:
        v.session_status[sid] = "revoked"
    if session is None:
        v.session = _new_session(a, now, "active")
    else:
        v.session = SessionInfo(
            session.session_id, a.sub, a.kind, "active", session.created, now, max(session.expires, a.token_exp),
            a.client, a.user_agent, a.device, a.credential, a.actor, None, None, session.cleared_at, a.iss)
    if pol.raises_risk:
        v.risk = [*risk, (pol.raises_risk, now + pol.risk_window)]
    v.lock_grants = grants
    v.record_jti = pol.one_time
    expires = now + a.lease
    v.ticket_record = TicketRecord(a.ticket_id, a.sub, a.session_id, a.token_hash, client, pol.tags, pol.conflicts,
                                   pol.exclusive, expires)
    v.ticket = Ticket(a.ticket_id, a.sub, a.session_id, {key: fence for key, _, fence in grants} if grants else {},
                      expires, a.iss)
    return v


def _merge_locks(locks: tuple[LockRequest, ...]) -> Sequence[LockRequest]:
    """One request per key; exclusive wins when two templates render the same key."""
    if len(locks) == 1:
        return locks
    merged: dict[str, LockRequest] = {}
    for req in locks:
        if req.key not in merged or req.mode == "exclusive":
            merged[req.key] = req
    return list(merged.values())


def _new_session(a: Admission, now: float, status: SessionStatus) -> SessionInfo:
    expires = a.token_exp if status == "active" else max(a.token_exp, now + STATUS_RETENTION)
    return SessionInfo(a.session_id, a.sub, a.kind, status, now, now, expires, a.client,
                       a.user_agent, a.device, a.credential, a.actor, iss=a.iss)


def _age(x: SessionInfo) -> tuple[float, str]:
    return x.created, x.session_id


def _at_most(limit: int, noun: str, one: str, many: str) -> str:
    """``at most 1 active session is`` / ``at most 3 active sessions are`` (the Lua rule words it the same way)."""
    return f"at most {limit} {noun} {one}" if limit == 1 else f"at most {limit} {noun}s {many}"


def _deny(v: Verdict, code: str, detail: str, retry_after: int | None = None) -> Verdict:
    v.code, v.detail, v.retry_after = code, detail, retry_after
    return v

