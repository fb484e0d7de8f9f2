"""The operations on the shared state, and the audit trail: what operators, the CLI and security events do.

:class:`Operations` needs a store and nothing else (no token keys): ``sa-middleware`` runs it against the store the
applications share, and :class:`~sa_middleware.Guard` inherits it, so ``guard.rotate(sub)`` and
``sa-middleware rotate SUB`` are the same code. Every operation is written to the audit trail with its ``source``
(``operator`` for Python calls unless told otherwise, ``cli``, ``event:<type>`` for security events).

Principal state is kept per issuer and subject. The operations on a principal take ``issuer=``; without it, a
Guard that trusts one issuer uses that one (a Guard that pins none keeps every principal under the empty issuer),
and otherwise the issuer is looked up in the store: the one issuer the subject is known under, else an error that
names the candidates (see docs/issuers-and-sessions.md).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from .audit import DEFAULT_AUDIT_BUFFER, AuditBuffer
from .errors import ConfigurationError, IssuerRequired
from .records import AuditRecord, LockInfo, SessionInfo
from .stores.base import Store, check_audit_retention, open_store, scoped

__all__ = ["MAX_AUDIT_LIMIT", "Operations"]

log = logging.getLogger("sa_middleware")

_MAX_ID = 256
_MAX_GEN = 2**53 - 1  # exact in every store (SQLite integers, Lua doubles)
_MAX_SOURCE = 80
_FLUSH_BATCH = 1000  # records per store call when the buffer is written
#: the most records one ``audit`` query returns
MAX_AUDIT_LIMIT = 10_000


class Operations:
    """The operations of the Guard on a store alone: ``Operations("sqlite:///sa.db").rotate("svc-billing")``.

    ``session_idle`` is what :meth:`sessions` counts as active; ``audit_retention`` (seconds) and
    ``audit_max_records`` override the store's audit retention (default 7 days and 100,000 records);
    ``audit_buffer`` bounds the records this process holds while the store cannot take them; ``source`` is the
    audit source of operations called without one. ``issuer`` is the issuer of the principals named without one
    (default: looked up in the store, see the module docstring).
    """

    #: what to tell a caller who must name the issuer (the CLI says ``--issuer``)
    issuer_hint = "issuer="

    def __init__(self, store: str | Store = "sqlite:///sa-middleware.db", *, session_idle: float = 900.0,
                 audit_retention: float | None = None, audit_max_records: int | None = None,
                 audit_buffer: int = DEFAULT_AUDIT_BUFFER, source: str = "operator", issuer: str | None = None) -> None:
        if isinstance(session_idle, bool) or not isinstance(session_idle, int | float) \
                or not math.isfinite(session_idle) or session_idle <= 0:
            raise ConfigurationError("session_idle must be a positive, finite number of seconds")
        check_audit_retention(audit_retention, audit_max_records)
        self.source = _source(source)
        #: the issuers a principal named without one may belong to (None: any the store knows)
        self.issuers: tuple[str, ...] | None = None if issuer is None else (_issuer(issuer),)
        self._audit = AuditBuffer(audit_buffer)
        self._audit_unsupported = False
        self.store: Store = open_store(store)
        self.store.configure_audit(retention=audit_retention, max_records=audit_max_records)
        self.session_idle = float(session_idle)

    def close(self) -> None:
        """Write what the audit buffer holds (best effort) and close the store."""
        self.flush_audit()
        self.store.close()

    # -- the audit trail ---------------------------------------------------------------------------------------

    def audit(self, sub: str | None = None, session_id: str | None = None, code: str | None = None,
              since: float | datetime | None = None, until: float | datetime | None = None, limit: int = 100, *,
              kind: str | None = None) -> list[AuditRecord]:
        """The audit records matching every filter given (``since <= time <= until``, seconds since the epoch or
        datetimes), newest first, at most ``limit``. This process's buffered records are written first."""
        query = _audit_query(sub, session_id, code, since, until, limit, kind)
        self.flush_audit()
        return self.store.audit(**query)

    async def aaudit(self, sub: str | None = None, session_id: str | None = None, code: str | None = None,
                     since: float | datetime | None = None, until: float | datetime | None = None, limit: int = 100,
                     *, kind: str | None = None) -> list[AuditRecord]:
        query = _audit_query(sub, session_id, code, since, until, limit, kind)
        await self.aflush_audit()
        return await self.store.aaudit(**query)

    def flush_audit(self) -> int:
        """Write the buffered audit records now (the Guard's keeper does it every second); returns how many were
        written. A failing store keeps them buffered for the next flush."""
        records = self._audit.take()
        done = 0
        while done < len(records):
            batch = records[done:done + _FLUSH_BATCH]
            try:
                self.store.record_audit(batch)
            except NotImplementedError:
                self._unsupported()
                return done
            except Exception as exc:  # the store is down: keep them for the next round (bounded)
                self._audit.give_back(records[done:])
                log.warning("sa-middleware: audit records not written (%d kept for the next try): %s",
                            len(records) - done, exc)
                return done
            done += len(batch)
        return done

    async def aflush_audit(self) -> int:
        """Async twin of :meth:`flush_audit`."""
        records = self._audit.take()
        done = 0
        while done < len(records):
            batch = records[done:done + _FLUSH_BATCH]
            try:
                await self.store.arecord_audit(batch)
            except NotImplementedError:
                self._unsupported()
                return done
            except Exception as exc:
                self._audit.give_back(records[done:])
                log.warning("sa-middleware: audit records not written (%d kept for the next try): %s",
                            len(records) - done, exc)
                return done
            done += len(batch)
        return done

    def _buffer(self, record: AuditRecord) -> None:
        """Keep a record for the next flush (subclasses start their flusher here)."""
        self._audit.add(record)

    def _unsupported(self) -> None:
        if not self._audit_unsupported:
            self._audit_unsupported = True
            log.warning("sa-middleware: %s keeps no audit trail (record_audit not implemented); audit records are "
                        "dropped", type(self.store).__name__)

    def _operation(self, code: str, source: str | None, sub: str | None = None, session_id: str | None = None,
                   detail: str = "", iss: str = "") -> AuditRecord:
        if iss and self.issuers != (iss,):  # the issuer, unless it is the only one here
            detail = f"{detail}; issuer {iss}" if detail else f"issuer {iss}"
        return AuditRecord("operation", code, self.source if source is None else _source(source), sub, session_id,
                           None, detail)

    # -- issuers -----------------------------------------------------------------------------------------------

    def issuer_of(self, sub: str, issuer: str | None = None, *, known: bool = True) -> str:
        """The issuer of the principal ``sub``: ``issuer`` when given, else this object's one issuer, else the one
        issuer the store knows ``sub`` under. Raises IssuerRequired when that is ambiguous, or (``known``) when
        the store knows ``sub`` under none of the candidates; with ``known=False`` (listings) that is ""."""
        if issuer is not None:
            return _issuer(issuer)
        if self.issuers is not None and len(self.issuers) == 1:
            return self.issuers[0]
        sub = _arg(sub, "sub")
        try:
            found = self.store.issuers(sub)
        except NotImplementedError:  # a store written before issuers
            found = []
        return self._pick_issuer(sub, found, known)

    async def aissuer_of(self, sub: str, issuer: str | None = None, *, known: bool = True) -> str:
        """Async twin of :meth:`issuer_of`."""
        if issuer is not None:
            return _issuer(issuer)
        if self.issuers is not None and len(self.issuers) == 1:
            return self.issuers[0]
        sub = _arg(sub, "sub")
        try:
            found = await self.store.aissuers(sub)
        except NotImplementedError:
            found = []
        return self._pick_issuer(sub, found, known)

    def _pick_issuer(self, sub: str, found: list[str], known: bool) -> str:
        if self.issuers is not None:
            found = [x for x in found if x in self.issuers]
        elif len(found) > 1 and "" in found:  # state stored before issuers: every issuer's principal inherits it
            found = [x for x in found if x]
        if len(found) == 1:
            return found[0]
        hint = self.issuer_hint
        if found:
            raise IssuerRequired(f"ambiguous: subject {sub} is known under issuers "
                                 f"{', '.join(repr(x) for x in found)}; pass {hint}")
        if not known:
            return ""
        raise IssuerRequired(f"subject {sub} is not known to the store under "
                             f"{'any issuer' if self.issuers is None else 'the issuers trusted here'}; pass "
                             f"{hint} (the empty string for tokens without an issuer)")

    def _note(self, record: AuditRecord) -> None:
        """Write an operation's record at once; if the store fails now, buffer it."""
        try:
            self.store.record_audit([record])
        except NotImplementedError:
            self._unsupported()
        except Exception as exc:
            log.warning("sa-middleware: audit record of %s buffered: %s", record.code, exc)
            self._buffer(record)

    async def _anote(self, record: AuditRecord) -> None:
        try:
            await self.store.arecord_audit([record])
        except NotImplementedError:
            self._unsupported()
        except Exception as exc:
            log.warning("sa-middleware: audit record of %s buffered: %s", record.code, exc)
            self._buffer(record)

    # -- operations (contract) ---------------------------------------------------------------------------------

    def rotate(self, sub: str, *, issuer: str | None = None, source: str | None = None) -> int:
        """Bump ``sub``'s generation: every token of a lower generation is refused from now on."""
        iss = self.issuer_of(_arg(sub, "sub"), issuer)
        generation = self.store.rotate(sub, *scoped(iss))
        self._note(self._operation("rotate", source, sub, detail=f"generation {generation}", iss=iss))
        return generation

    def revoke_principal(self, sub: str, *, issuer: str | None = None, source: str | None = None) -> float:
        """Refuse every token of ``sub`` issued before now (not-before watermark)."""
        iss = self.issuer_of(_arg(sub, "sub"), issuer)
        watermark = self.store.revoke_principal(sub, *scoped(iss))
        self._note(self._operation("revoke_principal", source, sub, detail=_watermark(watermark), iss=iss))
        return watermark

    def revoke_session(self, session_id: str, *, source: str | None = None) -> bool:
        """Revoke one session (also one not seen yet)."""
        known = self.store.revoke_session(_arg(session_id, "session_id"))
        self._note(self._operation("revoke_session", source, session_id=session_id, detail=_revoked(known)))
        return known

    def report_compromise(self, sub: str | None = None, session_id: str | None = None, *,
                          issuer: str | None = None, source: str | None = None) -> list[str]:
        """Mark every context related to ``sub`` or ``session_id`` compromised; returns their session ids. A
        session alone names its own principal (and issuer)."""
        args = _compromise_args(sub, session_id, issuer)
        iss = "" if sub is None else self.issuer_of(sub, issuer)
        marked = self.store.report_compromise(*args, *scoped(iss))
        self._note(self._operation("report_compromise", source, *args, detail=_marked("compromised", marked),
                                   iss=iss))
        return marked

    def pause_session(self, session_id: str, *, source: str | None = None) -> bool:
        """Pause a session until :meth:`resume_session`."""
        paused = self.store.pause_session(_arg(session_id, "session_id"))
        self._note(self._operation("pause_session", source, session_id=session_id, detail=_paused(paused)))
        return paused

    def resume_session(self, session_id: str, *, source: str | None = None) -> bool:
        """Clear a paused or compromised session (an operator's decision)."""
        resumed = self.store.resume_session(_arg(session_id, "session_id"))
        self._note(self._operation("resume_session", source, session_id=session_id, detail=_resumed(resumed)))
        return resumed

    def set_device_status(self, device_id: str, compliant: bool, *, source: str | None = None) -> None:
        """Mark a device compliant or non-compliant."""
        self.store.set_device_status(_arg(device_id, "device_id"), bool(compliant))
        self._note(self._operation("set_device_status", source, detail=_device(device_id, compliant)))

    def set_privileges(self, sub: str, scopes: Iterable[str] | None, *, issuer: str | None = None,
                       source: str | None = None) -> None:
        """Limit the scopes of ``sub``'s tokens issued before now (``None`` lifts the limit)."""
        values = _scopes(scopes)
        iss = self.issuer_of(_arg(sub, "sub"), issuer)
        self.store.set_privileges(sub, values, *scoped(iss))
        self._note(self._operation("set_privileges", source, sub, detail=_privileges(values), iss=iss))

    def sessions(self, sub: str, *, issuer: str | None = None) -> list[SessionInfo]:
        """``sub``'s active sessions with their status."""
        iss = self.issuer_of(_arg(sub, "sub"), issuer, known=False)
        return self.store.sessions(sub, self.session_idle, *scoped(iss))

    def locks(self) -> list[LockInfo]:
        """Every object lock held now, with its fencing token."""
        return self.store.locks()

    # -- operations of security events (sa_middleware.events; also usable directly) ------------------------------

    def revoke_sessions(self, sub: str, before: float | None = None, *, issuer: str | None = None,
                        source: str | None = None) -> list[str]:
        """Revoke every session of ``sub`` whose token was issued at or before ``before`` (default, and at most:
        now): they are refused with ``session_revoked``, while a token issued later opens a new session. Returns
        the ids of the stored sessions marked revoked (CAEP ``session-revoked`` for a principal)."""
        when = _time(before, "before")
        iss = self.issuer_of(_arg(sub, "sub"), issuer)
        marked = self.store.revoke_sessions(sub, when, *scoped(iss))
        self._note(self._operation("revoke_sessions", source, sub, detail=_marked("revoked", marked, before),
                                   iss=iss))
        return marked

    def disable_principal(self, sub: str, *, issuer: str | None = None, source: str | None = None) -> float:
        """Refuse every token of ``sub`` (``token_revoked``) until :meth:`enable_principal`; tokens issued before
        now stay refused after that too (RISC ``account-disabled``). Returns the time of the watermark."""
        iss = self.issuer_of(_arg(sub, "sub"), issuer)
        watermark = self.store.disable_principal(sub, *scoped(iss))
        self._note(self._operation("disable_principal", source, sub, detail="disabled; " + _watermark(watermark),
                                   iss=iss))
        return watermark

    def enable_principal(self, sub: str, *, issuer: str | None = None, source: str | None = None) -> bool:
        """Undo :meth:`disable_principal`: tokens issued since then are admitted again (RISC ``account-enabled``).
        Returns whether ``sub`` was disabled."""
        iss = self.issuer_of(_arg(sub, "sub"), issuer)
        enabled = self.store.enable_principal(sub, *scoped(iss))
        self._note(self._operation("enable_principal", source, sub,
                                   detail="enabled" if enabled else "was not disabled", iss=iss))
        return enabled

    def set_assurance(self, sub: str, level: str | None, at: float | None = None, *, issuer: str | None = None,
                      source: str | None = None) -> None:
        """Record ``sub``'s current assurance level (an ``acr`` value) as of ``at`` (default, and at most: now):
        for tokens issued before then, step-up (``acr_values``) checks ``level`` instead of the token's ``acr``
        (CAEP ``assurance-level-change``). ``level=None`` forgets it."""
        if level is not None:
            level = _arg(level, "level")
        when = _time(at, "at")
        iss = self.issuer_of(_arg(sub, "sub"), issuer)
        self.store.set_assurance(sub, level, when, *scoped(iss))
        self._note(self._operation("set_assurance", source, sub, detail=_assurance(level), iss=iss))

    def raise_risk(self, sub: str, amount: int, window: float, *, issuer: str | None = None,
                   source: str | None = None) -> None:
        """Add ``amount`` to ``sub``'s risk for ``window`` seconds, as an action with ``raises_risk`` would
        (CAEP ``risk-level-change``); routes with ``max_risk`` below it refuse with ``risk_too_high``."""
        args = _risk_args(amount, window)
        iss = self.issuer_of(_arg(sub, "sub"), issuer)
        self.store.raise_risk(sub, *args, *scoped(iss))
        self._note(self._operation("raise_risk", source, sub, detail=_risk(*args), iss=iss))

    # -- async twins -------------------------------------------------------------------------------------------

    async def arevoke_sessions(self, sub: str, before: float | None = None, *, issuer: str | None = None,
                               source: str | None = None) -> list[str]:
        when = _time(before, "before")
        iss = await self.aissuer_of(_arg(sub, "sub"), issuer)
        marked = await self.store.arevoke_sessions(sub, when, *scoped(iss))
        await self._anote(self._operation("revoke_sessions", source, sub, detail=_marked("revoked", marked, before),
                                          iss=iss))
        return marked

    async def adisable_principal(self, sub: str, *, issuer: str | None = None, source: str | None = None) -> float:
        iss = await self.aissuer_of(_arg(sub, "sub"), issuer)
        watermark = await self.store.adisable_principal(sub, *scoped(iss))
        await self._anote(self._operation("disable_principal", source, sub,
                                          detail="disabled; " + _watermark(watermark), iss=iss))
        return watermark

    async def aenable_principal(self, sub: str, *, issuer: str | None = None, source: str | None = None) -> bool:
        iss = await self.aissuer_of(_arg(sub, "sub"), issuer)
        enabled = await self.store.aenable_principal(sub, *scoped(iss))
        await self._anote(self._operation("enable_principal", source, sub,
                                          detail="enabled" if enabled else "was not disabled", iss=iss))
        return enabled

    async def aset_assurance(self, sub: str, level: str | None, at: float | None = None, *,
                             issuer: str | None = None, source: str | None = None) -> None:
        if level is not None:
            level = _arg(level, "level")
        when = _time(at, "at")
        iss = await self.aissuer_of(_arg(sub, "sub"), issuer)
        await self.store.aset_assurance(sub, level, when, *scoped(iss))
        await self._anote(self._operation("set_assurance", source, sub, detail=_assurance(level), iss=iss))

    async def araise_risk(self, sub: str, amount: int, window: float, *, issuer: str | None = None,
                          source: str | None = None) -> None:
        args = _risk_args(amount, window)
        iss = await self.aissuer_of(_arg(sub, "sub"), issuer)
        await self.store.araise_risk(sub, *args, *scoped(iss))
        await self._anote(self._operation("raise_risk", source, sub, detail=_risk(*args), iss=iss))

    async def arotate(self, sub: str, *, issuer: str | None = None, source: str | None = None) -> int:
        iss = await self.aissuer_of(_arg(sub, "sub"), issuer)
        generation = await self.store.arotate(sub, *scoped(iss))
        await self._anote(self._operation("rotate", source, sub, detail=f"generation {generation}", iss=iss))
        return generation

    async def arevoke_principal(self, sub: str, *, issuer: str | None = None, source: str | None = None) -> float:
        iss = await self.aissuer_of(_arg(sub, "sub"), issuer)
        watermark = await self.store.arevoke_principal(sub, *scoped(iss))
        await self._anote(self._operation("revoke_principal", source, sub, detail=_watermark(watermark), iss=iss))
        return watermark

    async def arevoke_session(self, session_id: str, *, source: str | None = None) -> bool:
        known = await self.store.arevoke_session(_arg(session_id, "session_id"))
        await self._anote(self._operation("revoke_session", source, session_id=session_id, detail=_revoked(known)))
        return known

    async def areport_compromise(self, sub: str | None = None, session_id: str | None = None, *,
                                 issuer: str | None = None, source: str | None = None) -> list[str]:
        args = _compromise_args(sub, session_id, issuer)
        iss = "" if sub is None else await self.aissuer_of(sub, issuer)
        marked = await self.store.areport_compromise(*args, *scoped(iss))
        await self._anote(self._operation("report_compromise", source, *args, detail=_marked("compromised", marked),
                                          iss=iss))
        return marked

    async def apause_session(self, session_id: str, *, source: str | None = None) -> bool:
        paused = await self.store.apause_session(_arg(session_id, "session_id"))
        await self._anote(self._operation("pause_session", source, session_id=session_id, detail=_paused(paused)))
        return paused

    async def aresume_session(self, session_id: str, *, source: str | None = None) -> bool:
        resumed = await self.store.aresume_session(_arg(session_id, "session_id"))
        await self._anote(self._operation("resume_session", source, session_id=session_id,
                                          detail=_resumed(resumed)))
        return resumed

    async def aset_device_status(self, device_id: str, compliant: bool, *, source: str | None = None) -> None:
        await self.store.aset_device_status(_arg(device_id, "device_id"), bool(compliant))
        await self._anote(self._operation("set_device_status", source, detail=_device(device_id, compliant)))

    async def aset_privileges(self, sub: str, scopes: Iterable[str] | None, *, issuer: str | None = None,
                              source: str | None = None) -> None:
        values = _scopes(scopes)
        iss = await self.aissuer_of(_arg(sub, "sub"), issuer)
        await self.store.aset_privileges(sub, values, *scoped(iss))
        await self._anote(self._operation("set_privileges", source, sub, detail=_privileges(values), iss=iss))

    async def asessions(self, sub: str, *, issuer: str | None = None) -> list[SessionInfo]:
        iss = await self.aissuer_of(_arg(sub, "sub"), issuer, known=False)
        return await self.store.asessions(sub, self.session_idle, *scoped(iss))

    async def alocks(self) -> list[LockInfo]:
        return await self.store.alocks()


# -- argument checks -------------------------------------------------------------------------------------------


def finite_number(value: Any) -> float | None:
    """``value`` as a float if it is a finite JSON number (not a bool), else ``None``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _arg(value: str, name: str) -> str:
    if not isinstance(value, str) or not value or len(value) > _MAX_ID:
        raise ConfigurationError(f"{name} must be a non-empty string of at most {_MAX_ID} characters")
    return value


_MAX_ISSUER = 2048


def _issuer(value: str) -> str:
    if not isinstance(value, str) or len(value) > _MAX_ISSUER:
        raise ConfigurationError(f"issuer must be a string of at most {_MAX_ISSUER} characters (\"\" for tokens "
                                 "without an issuer)")
    return value


def _time(value: float | None, name: str) -> float | None:
    if value is None:
        return None
    number = finite_number(value)
    if number is None:
        raise ConfigurationError(f"{name} must be a finite number of seconds since the epoch, or None")
    return number


def _risk_args(amount: int, window: float) -> tuple[int, float]:
    if isinstance(amount, bool) or not isinstance(amount, int) or not 1 <= amount <= _MAX_GEN:
        raise ConfigurationError("amount must be a positive integer")
    number = finite_number(window)
    if number is None or number <= 0:
        raise ConfigurationError("window must be a positive, finite number of seconds")
    return amount, number


def _compromise_args(sub: str | None, session_id: str | None,
                     issuer: str | None = None) -> tuple[str | None, str | None]:
    if sub is None and session_id is None:
        raise ConfigurationError("report_compromise needs sub or session_id")
    if sub is None and issuer is not None:
        raise ConfigurationError("issuer names the issuer of sub; a session names its own principal")
    return (None if sub is None else _arg(sub, "sub"),
            None if session_id is None else _arg(session_id, "session_id"))


def _scopes(scopes: Iterable[str] | None) -> list[str] | None:
    if scopes is None:
        return None
    if isinstance(scopes, str):
        scopes = scopes.split()
    result = list(scopes)
    if not all(isinstance(s, str) and s for s in result):
        raise ConfigurationError("scopes must be non-empty strings")
    return result


def _source(value: str) -> str:
    if not isinstance(value, str) or not value or len(value) > _MAX_SOURCE:
        raise ConfigurationError(f"source must be a non-empty string of at most {_MAX_SOURCE} characters")
    return value


def _when(value: float | datetime | None, name: str) -> float | None:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ConfigurationError(f"{name} must be an aware datetime (with a time zone)")
        return value.timestamp()
    return _time(value, name)


def _audit_query(sub: str | None, session_id: str | None, code: str | None, since: float | datetime | None,
                 until: float | datetime | None, limit: int, kind: str | None) -> dict[str, Any]:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_AUDIT_LIMIT:
        raise ConfigurationError(f"limit must be an integer from 1 to {MAX_AUDIT_LIMIT}")
    return {"sub": None if sub is None else _arg(sub, "sub"),
            "session_id": None if session_id is None else _arg(session_id, "session_id"),
            "code": None if code is None else _arg(code, "code"),
            "kind": None if kind is None else _arg(kind, "kind"),
            "since": _when(since, "since"), "until": _when(until, "until"), "limit": limit}


# -- audit details ---------------------------------------------------------------------------------------------


def iso(seconds: float) -> str:
    """A timestamp as ISO 8601 UTC with milliseconds, e.g. ``2025-11-28T19:56:01.250Z``."""
    try:
        text = datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")
    except (ValueError, OverflowError, OSError):  # beyond what datetime can show
        return f"{seconds:.3f}"
    return text.replace("+00:00", "Z")


def _watermark(at: float) -> str:
    return f"tokens issued before {iso(at)} refused"


def _revoked(known: bool) -> str:
    return "revoked" if known else "revoked before it was seen (remembered for 24 h)"


def _paused(paused: bool) -> str:
    return "paused" if paused else "not paused: unknown, revoked or compromised"


def _resumed(resumed: bool) -> str:
    return "resumed" if resumed else "nothing to resume: not paused or compromised"


def _device(device_id: str, compliant: bool) -> str:
    return f"device {device_id}: {'compliant' if compliant else 'non-compliant'}"


def _privileges(scopes: Sequence[str] | None) -> str:
    if scopes is None:
        return "scope limit lifted"
    return f"scopes of older tokens limited to: {' '.join(sorted(set(scopes)))}" if scopes else \
        "every scope of older tokens withdrawn"


def _assurance(level: str | None) -> str:
    return f"assurance level {level}" if level is not None else "assurance level forgotten"


def _risk(amount: int, window: float) -> str:
    return f"risk +{amount} for {window:g} s"


def _marked(what: str, ids: Sequence[str], before: float | None = None) -> str:
    shown = ", ".join(ids[:10]) + (f" and {len(ids) - 10} more" if len(ids) > 10 else "")
    head = f"tokens issued by {iso(before)}; " if before is not None else ""
    noun = "session" if len(ids) == 1 else "sessions"
    return head + (f"{len(ids)} {noun} {what}: {shown}" if ids else f"no stored session {what}")
