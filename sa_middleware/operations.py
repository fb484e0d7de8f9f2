"""The operations on the shared state, and the audit trail: what operators, the CLI and security events do.

:class:`Operations` needs a store and nothing else (no token keys): ``sa-middleware`` runs it against the store the
applications share, and :class:`~sa_middleware.Guard` inherits it, so ``guard.rotate(sub)`` and
``sa-middleware rotate SUB`` are the same code. Every operation is written to the audit trail with its ``source``
(``operator`` for Python calls unless told otherwise, ``cli``, ``event:<type>`` for security events).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from .audit import DEFAULT_AUDIT_BUFFER, AuditBuffer
from .errors import ConfigurationError
from .records import AuditRecord, LockInfo, SessionInfo
from .stores.base import Store, check_audit_retention, open_store
from .tokens import _KID_SHAPE

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
    audit source of operations called without one.
    """

    def __init__(self, store: str | Store = "sqlite:///sa-middleware.db", *, session_idle: float = 900.0,
                 audit_retention: float | None = None, audit_max_records: int | None = None,
                 audit_buffer: int = DEFAULT_AUDIT_BUFFER, source: str = "operator") -> None:
        if isinstance(session_idle, bool) or not isinstance(session_idle, int | float) \
                or not math.isfinite(session_idle) or session_idle <= 0:
            raise ConfigurationError("session_idle must be a positive, finite number of seconds")
        check_audit_retention(audit_retention, audit_max_records)
        self.source = _source(source)
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
                   detail: str = "") -> AuditRecord:
        return AuditRecord("operation", code, self.source if source is None else _source(source), sub, session_id,
                           None, detail)

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

    def rotate(self, sub: str, *, source: str | None = None) -> int:
        """Bump ``sub``'s generation: every token of a lower generation is refused from now on. When ``sub``'s
        latest token carried no generation claim, this logs :meth:`rotation_warning` (a new token will not help:
        use :meth:`revoke_principal`, and undo this with :meth:`reset_generation`)."""
        generation = self.store.rotate(_arg(sub, "sub"))
        self._note(self._operation("rotate", source, sub, detail=f"generation {generation}"))
        warning = self.rotation_warning(sub)
        if warning:
            log.warning("sa-middleware: %s", warning)
        return generation

    def rotation_warning(self, sub: str) -> str | None:
        """A warning when rotating ``sub`` refuses its tokens for good: its latest token carried no generation
        claim (its issuer sends none). None when its tokens carry one, or none was seen yet."""
        try:
            present = self.store.generation_claim(_arg(sub, "sub"))
        except NotImplementedError:
            return None
        return None if present is not False else _no_generation(sub)

    async def arotation_warning(self, sub: str) -> str | None:
        try:
            present = await self.store.ageneration_claim(_arg(sub, "sub"))
        except NotImplementedError:
            return None
        return None if present is not False else _no_generation(sub)

    def reset_generation(self, sub: str, *, source: str | None = None) -> int:
        """Undo :meth:`rotate`: set ``sub``'s generation back to 0, so tokens without a generation claim (and of
        any generation) are admitted again. Returns the generation it had."""
        previous = self.store.reset_generation(_arg(sub, "sub"))
        self._note(self._operation("reset_generation", source, sub, detail=f"generation {previous} -> 0"))
        return previous

    async def areset_generation(self, sub: str, *, source: str | None = None) -> int:
        previous = await self.store.areset_generation(_arg(sub, "sub"))
        await self._anote(self._operation("reset_generation", source, sub, detail=f"generation {previous} -> 0"))
        return previous

    def refresh_keys(self, *, source: str | None = None) -> None:
        """Ask every Guard sharing the store to fetch its issuer's signing keys (JWK set) now; they do within
        a few seconds."""
        self.store.note_keys(None)
        self._note(self._operation("refresh_keys", source, detail="signing keys refresh asked"))

    async def arefresh_keys(self, *, source: str | None = None) -> None:
        await self.store.anote_keys(None)
        await self._anote(self._operation("refresh_keys", source, detail="signing keys refresh asked"))

    def drop_key(self, kid: str, *, source: str | None = None) -> None:
        """Ask every Guard sharing the store to stop trusting the signing key ``kid`` (and forget the tokens it
        verified) within a few seconds, even while the issuer still publishes it; Guards started later refuse it
        too."""
        self.store.note_keys(_kid(kid))
        self._note(self._operation("drop_key", source, detail=f"signing key {kid} dropped"))

    async def adrop_key(self, kid: str, *, source: str | None = None) -> None:
        await self.store.anote_keys(_kid(kid))
        await self._anote(self._operation("drop_key", source, detail=f"signing key {kid} dropped"))

    def revoke_principal(self, sub: str, *, source: str | None = None) -> float:
        """Refuse every token of ``sub`` issued before now (not-before watermark)."""
        watermark = self.store.revoke_principal(_arg(sub, "sub"))
        self._note(self._operation("revoke_principal", source, sub, detail=_watermark(watermark)))
        return watermark

    def revoke_session(self, session_id: str, *, source: str | None = None) -> bool:
        """Revoke one session (also one not seen yet)."""
        known = self.store.revoke_session(_arg(session_id, "session_id"))
        self._note(self._operation("revoke_session", source, session_id=session_id, detail=_revoked(known)))
        return known

    def report_compromise(self, sub: str | None = None, session_id: str | None = None, *,
                          source: str | None = None) -> list[str]:
        """Mark every context related to ``sub`` or ``session_id`` compromised; returns their session ids."""
        args = _compromise_args(sub, session_id)
        marked = self.store.report_compromise(*args)
        self._note(self._operation("report_compromise", source, *args, detail=_marked("compromised", marked)))
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

    def set_privileges(self, sub: str, scopes: Iterable[str] | None, *, source: str | None = None) -> None:
        """Limit the scopes of ``sub``'s tokens issued before now (``None`` lifts the limit)."""
        values = _scopes(scopes)
        self.store.set_privileges(_arg(sub, "sub"), values)
        self._note(self._operation("set_privileges", source, sub, detail=_privileges(values)))

    def sessions(self, sub: str) -> list[SessionInfo]:
        """``sub``'s active sessions with their status."""
        return self.store.sessions(_arg(sub, "sub"), self.session_idle)

    def locks(self) -> list[LockInfo]:
        """Every object lock held now, with its fencing token."""
        return self.store.locks()

    def active_sessions(self, limit: int = 1000) -> list[SessionInfo]:
        """The active sessions of every principal, most recently seen first, at most ``limit``."""
        return self.store.all_sessions(self.session_idle, _limit(limit))

    # -- operations of security events (sa_middleware.events; also usable directly) ------------------------------

    def revoke_sessions(self, sub: str, before: float | None = None, *, source: str | None = None) -> list[str]:
        """Revoke every session of ``sub`` whose token was issued at or before ``before`` (default, and at most:
        now): they are refused with ``session_revoked``, while a token issued later opens a new session. Returns
        the ids of the stored sessions marked revoked (CAEP ``session-revoked`` for a principal)."""
        marked = self.store.revoke_sessions(_arg(sub, "sub"), _time(before, "before"))
        self._note(self._operation("revoke_sessions", source, sub, detail=_marked("revoked", marked, before)))
        return marked

    def disable_principal(self, sub: str, *, source: str | None = None) -> float:
        """Refuse every token of ``sub`` (``token_revoked``) until :meth:`enable_principal`; tokens issued before
        now stay refused after that too (RISC ``account-disabled``). Returns the time of the watermark."""
        watermark = self.store.disable_principal(_arg(sub, "sub"))
        self._note(self._operation("disable_principal", source, sub, detail="disabled; " + _watermark(watermark)))
        return watermark

    def enable_principal(self, sub: str, *, source: str | None = None) -> bool:
        """Undo :meth:`disable_principal`: tokens issued since then are admitted again (RISC ``account-enabled``).
        Returns whether ``sub`` was disabled."""
        enabled = self.store.enable_principal(_arg(sub, "sub"))
        self._note(self._operation("enable_principal", source, sub,
                                   detail="enabled" if enabled else "was not disabled"))
        return enabled

    def set_assurance(self, sub: str, level: str | None, at: float | None = None, *,
                      source: str | None = None) -> None:
        """Record ``sub``'s current assurance level (an ``acr`` value) as of ``at`` (default, and at most: now):
        for tokens issued before then, step-up (``acr_values``) checks ``level`` instead of the token's ``acr``
        (CAEP ``assurance-level-change``). ``level=None`` forgets it."""
        if level is not None:
            level = _arg(level, "level")
        self.store.set_assurance(_arg(sub, "sub"), level, _time(at, "at"))
        self._note(self._operation("set_assurance", source, sub, detail=_assurance(level)))

    def raise_risk(self, sub: str, amount: int, window: float, *, source: str | None = None) -> None:
        """Add ``amount`` to ``sub``'s risk for ``window`` seconds, as an action with ``raises_risk`` would
        (CAEP ``risk-level-change``); routes with ``max_risk`` below it refuse with ``risk_too_high``."""
        args = _risk_args(amount, window)
        self.store.raise_risk(_arg(sub, "sub"), *args)
        self._note(self._operation("raise_risk", source, sub, detail=_risk(*args)))

    # -- async twins -------------------------------------------------------------------------------------------

    async def arevoke_sessions(self, sub: str, before: float | None = None, *,
                               source: str | None = None) -> list[str]:
        marked = await self.store.arevoke_sessions(_arg(sub, "sub"), _time(before, "before"))
        await self._anote(self._operation("revoke_sessions", source, sub, detail=_marked("revoked", marked, before)))
        return marked

    async def adisable_principal(self, sub: str, *, source: str | None = None) -> float:
        watermark = await self.store.adisable_principal(_arg(sub, "sub"))
        await self._anote(self._operation("disable_principal", source, sub,
                                          detail="disabled; " + _watermark(watermark)))
        return watermark

    async def aenable_principal(self, sub: str, *, source: str | None = None) -> bool:
        enabled = await self.store.aenable_principal(_arg(sub, "sub"))
        await self._anote(self._operation("enable_principal", source, sub,
                                          detail="enabled" if enabled else "was not disabled"))
        return enabled

    async def aset_assurance(self, sub: str, level: str | None, at: float | None = None, *,
                             source: str | None = None) -> None:
        if level is not None:
            level = _arg(level, "level")
        await self.store.aset_assurance(_arg(sub, "sub"), level, _time(at, "at"))
        await self._anote(self._operation("set_assurance", source, sub, detail=_assurance(level)))

    async def araise_risk(self, sub: str, amount: int, window: float, *, source: str | None = None) -> None:
        args = _risk_args(amount, window)
        await self.store.araise_risk(_arg(sub, "sub"), *args)
        await self._anote(self._operation("raise_risk", source, sub, detail=_risk(*args)))

    async def arotate(self, sub: str, *, source: str | None = None) -> int:
        generation = await self.store.arotate(_arg(sub, "sub"))
        await self._anote(self._operation("rotate", source, sub, detail=f"generation {generation}"))
        warning = await self.arotation_warning(sub)
        if warning:
            log.warning("sa-middleware: %s", warning)
        return generation

    async def arevoke_principal(self, sub: str, *, source: str | None = None) -> float:
        watermark = await self.store.arevoke_principal(_arg(sub, "sub"))
        await self._anote(self._operation("revoke_principal", source, sub, detail=_watermark(watermark)))
        return watermark

    async def arevoke_session(self, session_id: str, *, source: str | None = None) -> bool:
        known = await self.store.arevoke_session(_arg(session_id, "session_id"))
        await self._anote(self._operation("revoke_session", source, session_id=session_id, detail=_revoked(known)))
        return known

    async def areport_compromise(self, sub: str | None = None, session_id: str | None = None, *,
                                 source: str | None = None) -> list[str]:
        args = _compromise_args(sub, session_id)
        marked = await self.store.areport_compromise(*args)
        await self._anote(self._operation("report_compromise", source, *args, detail=_marked("compromised", marked)))
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

    async def aset_privileges(self, sub: str, scopes: Iterable[str] | None, *, source: str | None = None) -> None:
        values = _scopes(scopes)
        await self.store.aset_privileges(_arg(sub, "sub"), values)
        await self._anote(self._operation("set_privileges", source, sub, detail=_privileges(values)))

    async def asessions(self, sub: str) -> list[SessionInfo]:
        return await self.store.asessions(_arg(sub, "sub"), self.session_idle)

    async def alocks(self) -> list[LockInfo]:
        return await self.store.alocks()

    async def aactive_sessions(self, limit: int = 1000) -> list[SessionInfo]:
        return await self.store.aall_sessions(self.session_idle, _limit(limit))


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


def _limit(limit: int) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_AUDIT_LIMIT:
        raise ConfigurationError(f"limit must be an integer from 1 to {MAX_AUDIT_LIMIT}")
    return limit


def _kid(value: str) -> str:
    if not isinstance(value, str) or not _KID_SHAPE.fullmatch(value):
        raise ConfigurationError("a key id is 1..128 characters of [A-Za-z0-9._:-]")
    return value


def _no_generation(sub: str) -> str:
    return (f"{sub}: its latest token carried no generation claim, so every token of {sub} is refused "
            "(stale_generation) and a new token from the same issuer will not help; undo with "
            f"reset_generation (sa-middleware rotate --reset -- {sub}) and use revoke_principal "
            f"(sa-middleware revoke --sub={sub}) instead")


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


def _compromise_args(sub: str | None, session_id: str | None) -> tuple[str | None, str | None]:
    if sub is None and session_id is None:
        raise ConfigurationError("report_compromise needs sub or session_id")
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
